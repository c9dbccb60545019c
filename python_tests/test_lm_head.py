"""The fused LM-head loss (define_kernels.lm_head) on every CPU backend against the float64
unfused loss (F.linear + F.cross_entropy + AugmentedLoss): values and every gradient, random
configs, autocast, torch.compile, opcheck, empty and all-ignored batches, bad inputs."""
import random

import pytest
import torch
import torch.nn.functional as F

from define_kernels import BackendUnavailableError, lm_head_loss
from define_kernels.lm_head import LMHeadSpec, registry
from define_kernels.lm_head.ops import lm_head_loss_op

from lm_head_cases import BACKENDS, SWEEP_BACKENDS, Case, random_case, unfused, usable
from tolerances import assert_close_scaled, assert_low_precision_close

SEEDS = range(24)


def _run(case: Case, backend, dtype, seed):
    h, proj, table, bias, targets = case.tensors(dtype, seed)
    leaves = [t.requires_grad_() for t in (h, proj, table, bias) if t is not None]
    spec = LMHeadSpec(**{k: v for k, v in case.options.items()})
    x = h if proj is None else F.linear(h, proj)
    usable(backend, x, table, spec)
    loss = lm_head_loss(h, table, targets, proj=proj, bias=bias, reduction=case.reduction,
                        backend=backend, **case.options)
    grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    return loss, grads, leaves


def _expected(case: Case, seed):
    h, proj, table, bias, targets = case.tensors(torch.float64, seed)
    leaves = [t.requires_grad_() for t in (h, proj, table, bias) if t is not None]
    loss = unfused(h, proj, table, bias, targets, reduction=case.reduction, **case.options)
    grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    return loss, grads


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_unfused_float64(backend, seed):
    case = random_case(random.Random(seed))
    expected, expected_grads = _expected(case, seed)
    for dtype in ((torch.float32, torch.float64) if backend == "reference" else (torch.float32,)):
        loss, grads, leaves = _run(case, backend, dtype, seed)
        assert loss.dtype == dtype
        if bool(torch.isnan(expected).any()):  # mean over no kept token, as F.cross_entropy
            assert bool(torch.isnan(loss).all()), f"{case}: {loss}"
            continue
        assert_close_scaled(loss, expected.to(dtype), name=f"loss {case}")
        for name, grad, want, leaf in zip("h proj table bias".split(), grads, expected_grads, leaves):
            assert_close_scaled(_zeros_if_none(grad, leaf), _zeros_if_none(want, leaf).to(dtype), name=f"grad {name}")


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3},
                                     {"alpha": 0.5, "tau": 2.0}])
def test_autocast_bf16(backend, options):
    """Under CPU autocast: bf16 GEMMs, fp32 loss and fp32 gradients of the fp32 parameters, within
    twice the unfused autocast loss's own error from the float64 loss."""
    case = Case(tokens=61, hidden=40, width=24, vocab=517, proj=True, bias=True, ignored=0.2,
                reduction="mean", options=options)
    exact, exact_grads = _expected(case, 3)
    h, proj, table, bias, targets = case.tensors(torch.float32, 3)
    leaves = [t.requires_grad_() for t in (h, proj, table, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        usable(backend, F.linear(h, proj), table, LMHeadSpec(compute_dtype="bfloat16"))
        loss = lm_head_loss(h, table, targets, proj=proj, bias=bias, backend=backend, **options)
        baseline = unfused(h, proj, table, bias, targets, **options)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, leaves)
    base_grads = torch.autograd.grad(baseline, leaves)
    assert all(g.dtype == torch.float32 for g in grads)
    assert_low_precision_close(loss.to(torch.bfloat16), exact, baseline.to(torch.bfloat16), name="loss")
    for name, grad, base, want in zip("h proj table bias".split(), grads, base_grads, exact_grads):
        scale = want.abs().max().clamp_min(1e-3)
        assert_low_precision_close((grad / scale).to(torch.bfloat16), want / scale,
                                   (base / scale).to(torch.bfloat16), name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_parts_and_reductions(backend):
    case = Case(tokens=23, hidden=8, width=8, vocab=97, proj=False, bias=False, ignored=0.3,
                reduction="none", options={"alpha": 0.5, "tau": 4.0, "kl_scale": "tau2"})
    h, _, table, _, targets = case.tensors(torch.float32, 5)
    usable(backend, h, table, LMHeadSpec())
    parts = lm_head_loss(h, table, targets, backend=backend, return_parts=True, reduction="none",
                         **case.options)
    keep = targets != -100
    ce = F.cross_entropy(h @ table.t(), targets, reduction="none")
    assert_close_scaled(parts.ce, ce)
    assert_close_scaled(parts.loss, parts.ce + 0.5 * 16.0 * parts.kl)
    assert bool((parts.kl[~keep] == 0).all()) and bool((parts.kl[keep] >= -1e-5).all())
    total = lm_head_loss(h, table, targets, backend=backend, reduction="sum", **case.options)
    mean = lm_head_loss(h, table, targets, backend=backend, **case.options)
    assert_close_scaled(total, parts.loss.sum())
    assert_close_scaled(mean, parts.loss.sum() / keep.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_ignored(backend):
    table = torch.randn(11, 4, requires_grad=True)
    usable(backend, table[:1], table, LMHeadSpec())
    for targets in (torch.empty(0, dtype=torch.long), torch.full((5,), -100)):
        h = torch.randn(len(targets), 4, requires_grad=True)
        assert bool(torch.isnan(lm_head_loss(h, table, targets, backend=backend)))  # as F.cross_entropy
        total = lm_head_loss(h, table, targets, reduction="sum", backend=backend)
        assert float(total.detach()) == 0.0
        total.backward()
        assert float(h.grad.abs().sum()) == 0.0 and float(table.grad.abs().sum()) == 0.0
        table.grad = None


def test_sparse_grad_and_leading_dims():
    table = torch.randn(50, 6, requires_grad=True)
    h = torch.randn(3, 4, 6)
    targets = torch.randint(0, 50, (3, 4))
    lm_head_loss(h, table, targets, sparse_grad=True).backward()
    assert table.grad.is_sparse
    dense = table.detach().clone().requires_grad_()
    lm_head_loss(h, dense, targets).backward()
    assert_close_scaled(table.grad.to_dense(), dense.grad)
    assert lm_head_loss(h, table, targets, reduction="none").shape == (3, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    case = Case(tokens=19, hidden=12, width=8, vocab=41, proj=True, bias=True, ignored=0.2,
                reduction="mean", options={"label_smoothing": 0.1, "alpha": 0.3})
    h, proj, table, bias, targets = case.tensors(torch.float32, 2)
    usable(backend, F.linear(h, proj), table, LMHeadSpec())

    def step(h, proj, table, bias, targets):
        return lm_head_loss(h, table, targets, proj=proj, bias=bias, backend=backend, **case.options)

    leaves = [t.requires_grad_() for t in (h, proj, table, bias)]
    eager = step(h, proj, table, bias, targets)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(h, proj, table, bias, targets)
    assert_close_scaled(compiled, eager)
    for grad, want in zip(torch.autograd.grad(compiled, leaves), eager_grads):
        assert_close_scaled(grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(7, 5, requires_grad=True)
    table = torch.randn(13, 5, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    targets = torch.tensor([0, 12, -100, 3, 3, 7, 1])
    spec = LMHeadSpec(label_smoothing=0.1, alpha=0.5, tau=2.0)
    usable(backend, x, table, spec)
    torch.library.opcheck(lm_head_loss_op, (x, table, bias, targets, spec.key, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(backend):
    table = torch.randn(10, 4)
    h = torch.randn(3, 4)
    usable(backend, h, table, LMHeadSpec())
    good = torch.tensor([1, 2, 3])
    cases = [
        (IndexError, "targets", dict(targets=torch.tensor([1, 10, 2]))),
        (IndexError, "targets", dict(targets=torch.tensor([1, -5, 2]))),
        (ValueError, "targets", dict(targets=torch.tensor([1.0, 2.0, 3.0]))),
        (ValueError, "targets", dict(targets=torch.tensor([1, 2]))),
        (ValueError, "x must have shape", dict(h=torch.randn(3, 5))),
        (ValueError, "proj", dict(proj=torch.randn(4, 7))),
        (ValueError, "bias", dict(bias=torch.randn(9))),
        (ValueError, "ignore_index", dict(ignore_index=3)),
        (ValueError, "tau", dict(alpha=0.5, tau=0.0)),
        (ValueError, "tau", dict(tau=-1.0)),
        (ValueError, "kl_scale", dict(kl_scale="tau3")),
        (ValueError, "label_smoothing", dict(label_smoothing=1.5)),
        (ValueError, "reduction", dict(reduction="max")),
        (ValueError, "padding_idx", dict(padding_idx=10)),
        (ValueError, "dtype", dict(h=torch.randn(3, 4, dtype=torch.float64))),
        (ValueError, "backend", dict(backend="nope")),
    ]
    for error, words, change in cases:
        args = dict(h=h, table=table, targets=good, backend=backend)
        args.update(change)
        with pytest.raises(error, match=words):
            lm_head_loss(args.pop("h"), args.pop("table"), args.pop("targets"), **args)


def test_unavailable_backend_raises_with_reasons():
    spec = LMHeadSpec(alpha=0.5, detach_target=False)
    with pytest.raises(BackendUnavailableError, match="detach_target"):
        registry.select("cpu_cpp", torch.randn(2, 3), torch.randn(5, 3), spec)
    assert registry.select("auto", torch.randn(2, 3), torch.randn(5, 3), spec).name == "reference"


def test_reference_scratch_is_bounded():
    """The reference's logits chunk never exceeds CHUNK_ELEMENTS (a [tokens x V] proxy)."""
    from define_kernels.lm_head import reference
    for tokens, vocab in ((5, 10), (4096, 267_735), (100_000, 33_278)):
        rows = [s.stop - s.start for s in reference._chunks(tokens, vocab)]
        assert sum(rows) == tokens
        assert max(rows) * vocab <= max(reference.CHUNK_ELEMENTS, vocab)


def test_compile_under_autocast():
    table = torch.randn(300, 16, requires_grad=True)
    proj = torch.randn(16, 24, requires_grad=True)
    h = torch.randn(40, 24)
    targets = torch.randint(0, 300, (40,))

    def step(h, proj, table):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lm_head_loss(h, table, targets, proj=proj, label_smoothing=0.1)

    eager = step(h, proj, table)
    eager_grads = torch.autograd.grad(eager, (proj, table))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(h, proj, table)
    assert_close_scaled(compiled, eager)
    for grad, want in zip(torch.autograd.grad(compiled, (proj, table)), eager_grads):
        assert grad.dtype == torch.float32
        assert_close_scaled(grad, want, dtype=torch.bfloat16)
