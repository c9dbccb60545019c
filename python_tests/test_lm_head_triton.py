"""The `triton` LM-head backend against an unfused float64 computation, through lm_head_loss.

The unfused form holds the whole [T, V] logits: z = x Eᵀ + b, log_softmax, the augmented loss's
KL, autograd. On GPU-less machines conftest.py sets TRITON_INTERPRET=1: torch.mm runs on the CPU
and the kernels in Triton's interpreter, with tiny tiles and vocabulary chunks (triton_backend
INTERPRETER_*), so V = 130 spans several chunks and a partial last one. bf16 follows the
flash-attention rule of tolerances.py against the same unfused computation run in bf16 (the
interpreter's fp32 -> bf16 stores of dz truncate where a GPU rounds to nearest: a harder test).
"""
import subprocess
import sys

import pytest
import torch

from define_kernels.lm_head import LMHeadSpec, lm_head_loss, registry, triton_backend

import expectations
from tolerances import LOW_PRECISION_FLOOR, _describe, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (name, V, n, T, options): V not a multiple of any tile or chunk, odd widths, one token, ignored
# and padding targets, every loss term and kl_scale.
CASES = [
    ("v1", 1, 5, 7, dict(bias=True)),
    ("v7_one_token", 7, 3, 1, dict()),
    ("v130_bias_padding_ignored", 130, 8, 13, dict(bias=True, padding_idx=5, ignored=3)),
    ("smoothing_zloss", 130, 6, 9, dict(label_smoothing=0.1, z_loss=1e-2)),
    ("augmented_tau", 61, 5, 11, dict(alpha=0.5, tau=2.0, padding_idx=2, ignored=2)),
    ("augmented_tau2_bias_smoothing", 47, 7, 6, dict(alpha=0.3, tau=3.0, kl_scale="tau2", bias=True,
                                                     label_smoothing=0.2)),
    ("augmented_none_zloss", 33, 4, 5, dict(alpha=1.0, tau=1.5, kl_scale="none", z_loss=1e-3, bias=True,
                                            padding_idx=0)),
]
LOSS_OPTIONS = ("label_smoothing", "z_loss", "alpha", "tau", "kl_scale", "padding_idx")


def _usable(x, table, spec):
    """Skip with the registry's reasons; fail instead where CI expects `triton`
    (DEFINE_KERNELS_EXPECT), unless the reason is only the compute dtype. The tensors are on
    DEVICE, which the backend takes when it runs at all (CPU: with the interpreter), so a device
    reason fails too."""
    reasons = registry._REGISTRY["triton"].reasons(x, table, spec) if "triton" in registry.names() \
        else ["LM-head backend triton is not registered"]
    if reasons:
        message = "LM-head backend triton: " + "; ".join(reasons)
        if expectations.is_expected("triton") and not all(r.startswith("compute dtype ") for r in reasons):
            pytest.fail(f"{message} (expected by {expectations.ENV_EXPECT})")
        pytest.skip(message)


def _inputs(vocab, width, tokens, options):
    x = torch.randn(tokens, width, dtype=torch.float64)
    table = 0.5 * torch.randn(vocab, width, dtype=torch.float64)
    bias = 0.3 * torch.randn(vocab, dtype=torch.float64) if options.get("bias") else None
    targets = torch.randint(0, vocab, (tokens,))
    targets[0] = vocab - 1
    padding_idx = options.get("padding_idx")
    if padding_idx is not None and tokens > 1:
        targets[1] = padding_idx  # a padding target: its similarity targets are uniform
    targets[tokens - options.get("ignored", 0):] = -100
    return x, table, bias, targets


def _unfused(x, table, bias, targets, options, dtype):
    """Per-token (loss, ce, kl) and the gradients of sum(loss * weight) w.r.t. (x, table, bias),
    all computed in `dtype` over the full logits; `weight` is attached as .weight on return."""
    leaves = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (x, table, bias)]
    x_, table_, bias_ = leaves
    spec = LMHeadSpec(**{k: v for k, v in options.items() if k in LOSS_OPTIONS})
    rows = table_
    if spec.padding_idx is not None:
        keep = torch.ones(table.shape[0], 1, dtype=dtype)
        keep[spec.padding_idx] = 0
        rows = table_ * keep
    z = x_ @ rows.t() + (bias_ if bias_ is not None else 0)
    kept = targets != spec.ignore_index
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(z, dim=1)
    eps = spec.label_smoothing
    ce = -(1 - eps) * logp.gather(1, safe[:, None]).squeeze(1) - eps * logp.mean(dim=1)
    loss = ce + spec.z_loss * torch.logsumexp(z, dim=1) ** 2
    kl = torch.zeros_like(ce)
    if spec.augmented:
        s = (rows[safe] @ rows.t()).detach() / spec.tau
        kl = (torch.softmax(s, 1) * (torch.log_softmax(s, 1) - torch.log_softmax(z / spec.tau, 1))).sum(1)
        loss = loss + spec.kl_coef * kl
    zero = torch.zeros((), dtype=dtype)
    loss, ce, kl = (torch.where(kept, t, zero) for t in (loss, ce, kl))
    weight = torch.linspace(0.5, 1.5, len(targets), dtype=torch.float64)
    grads = torch.autograd.grad((loss * weight.to(dtype)).sum(), [t for t in leaves if t is not None])
    return [loss.detach(), ce.detach(), kl.detach()], list(grads), weight


def _fused(x, table, bias, targets, options, dtype, weight):
    leaves = [t.to(DEVICE, dtype).requires_grad_(True) if t is not None else None for t in (x, table, bias)]
    spec_options = {k: v for k, v in options.items() if k in LOSS_OPTIONS}
    _usable(leaves[0], leaves[1], LMHeadSpec(**spec_options))
    parts = lm_head_loss(leaves[0], leaves[1], targets.to(DEVICE), bias=leaves[2], reduction="none",
                         backend="triton", return_parts=True, **spec_options)
    grads = torch.autograd.grad((parts.loss * weight.to(DEVICE, parts.loss.dtype)).sum(),
                                [t for t in leaves if t is not None])
    return [parts.loss.detach(), parts.ce, parts.kl], list(grads)


def _assert_low_precision(actual, exact, in_dtype, dtype, name):
    """tolerances.assert_low_precision_close with the floor of the compute dtype named here:
    the per-token losses come back in fp32 from a bf16 computation."""
    actual = actual.cpu()
    error = (actual.double() - exact).abs().max().item() if actual.numel() else 0.0
    bound = 2 * ((in_dtype.double() - exact).abs().max().item() if actual.numel() else 0.0) \
        + LOW_PRECISION_FLOOR[dtype]
    assert error <= bound, f"{_describe(actual, exact, name)}; bound {bound:.3e}"


NAMES = ("loss", "ce", "kl", "grad_x", "grad_table", "grad_bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,vocab,width,tokens,options", CASES, ids=[case[0] for case in CASES])
def test_matches_unfused_float64(name, vocab, width, tokens, options, dtype):
    x, table, bias, targets = _inputs(vocab, width, tokens, options)
    # the exact result of the inputs as the backend sees them (rounded to dtype)
    rounded = [t.to(dtype).double() if t is not None else None for t in (x, table, bias)]
    exact_parts, exact_grads, weight = _unfused(*rounded, targets, options, torch.float64)
    parts, grads = _fused(x, table, bias, targets, options, dtype, weight)
    assert [g.dtype for g in grads] == [dtype] * len(grads)
    if dtype == torch.float32:
        for actual, exact, label in zip(parts + grads, exact_parts + exact_grads, NAMES):
            assert_close(actual.cpu(), exact.float(), dtype=torch.float32, name=label)
        return
    in_parts, in_grads, _ = _unfused(x, table, bias, targets, options, dtype)
    for actual, exact, in_dtype, label in zip(parts + grads, exact_parts + exact_grads, in_parts + in_grads, NAMES):
        _assert_low_precision(actual, exact, in_dtype, dtype, label)


def test_autocast_keeps_fp32_master_weights():
    """Under autocast the GEMMs run in bf16 on chunks of the fp32 table; gradients come back fp32."""
    options = dict(bias=True, label_smoothing=0.1, alpha=0.5, tau=2.0, padding_idx=4)
    x, table, bias, targets = _inputs(70, 6, 9, options)
    exact_parts, exact_grads, weight = _unfused(x, table, bias, targets, options, torch.float64)
    in_parts, in_grads, _ = _unfused(x, table, bias, targets, options, torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        parts, grads = _fused(x, table, bias, targets, options, torch.float32, weight)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    for actual, exact, in_dtype, label in zip(parts + grads, exact_parts + exact_grads, in_parts + in_grads, NAMES):
        _assert_low_precision(actual, exact, in_dtype, torch.bfloat16, label)


@pytest.mark.parametrize("tokens", [0, 4])
def test_no_kept_tokens(tokens):
    table = torch.randn(11, 4, device=DEVICE, requires_grad=True)
    h = torch.randn(tokens, 4, device=DEVICE, requires_grad=True)
    _usable(h, table, LMHeadSpec())
    loss = lm_head_loss(h, table, torch.full((tokens,), -100, device=DEVICE), reduction="sum", backend="triton")
    loss.backward()
    assert loss.item() == 0 and not table.grad.any() and not h.grad.any()


def test_one_chunk_equals_many(monkeypatch):
    """The chunking changes only the order of fp32 sums: one chunk and many agree closely.
    (Scratch for one column tile per chunk: 16 columns interpreted, 128-256 on a GPU.)"""
    options = dict(bias=True, alpha=0.5, label_smoothing=0.1, padding_idx=3)
    tokens, vocab = 6, 300  # past 256 columns: two chunks on a GPU too
    x, table, bias, targets = _inputs(vocab, 5, tokens, options)
    _, _, weight = _unfused(x, table, bias, targets, options, torch.float64)
    monkeypatch.setattr(triton_backend, "INTERPRETER_SCRATCH_ELEMENTS", tokens)
    monkeypatch.setattr(triton_backend, "SCRATCH_ELEMENTS", tokens)
    block = triton_backend.tiles()["grad"]["BLOCK_V"]
    assert triton_backend.chunk_columns(tokens, vocab, block) == block < vocab
    many = _fused(x, table, bias, targets, options, torch.float32, weight)
    monkeypatch.setattr(triton_backend, "INTERPRETER_SCRATCH_ELEMENTS", 1 << 24)
    monkeypatch.setattr(triton_backend, "SCRATCH_ELEMENTS", 1 << 24)
    one = _fused(x, table, bias, targets, options, torch.float32, weight)
    for a, b, label in zip(many[0] + many[1], one[0] + one[1], NAMES):
        assert_close(a.cpu(), b.cpu(), dtype=torch.float32, name=label)


def test_chunk_columns_bound_the_scratch():
    block = 256
    for tokens in (1, 8192, 1 << 20):
        for vocab in (1, 300, 267_735, 10**7):
            columns = triton_backend.chunk_columns(tokens, vocab, block)
            assert columns % block == 0 and block <= columns <= max(block, -(-vocab // block) * block)
            budget = triton_backend.INTERPRETER_SCRATCH_ELEMENTS if triton_backend.interpreting() \
                else triton_backend.SCRATCH_ELEMENTS
            assert tokens * columns <= max(budget, tokens * block)
    augmented = LMHeadSpec(alpha=0.5)
    assert triton_backend.workspace_bytes(8192, 267_735, augmented, torch.bfloat16) == \
        triton_backend.workspace_bytes(8192, 10**7, augmented, torch.bfloat16) == \
        2 * triton_backend.workspace_bytes(8192, 10**7, LMHeadSpec(), torch.bfloat16)


def test_reasons_and_auto_selection():
    x, table = torch.randn(3, 4, device=DEVICE), torch.randn(9, 4, device=DEVICE)
    _usable(x, table, LMHeadSpec())
    backend = registry._REGISTRY["triton"]
    spec = LMHeadSpec(alpha=0.5, detach_target=False)
    assert any("reference backend only" in r for r in backend.reasons(x, table, spec))
    with pytest.raises(Exception, match="reference backend only"):
        lm_head_loss(x, table, torch.zeros(3, dtype=torch.long, device=DEVICE), alpha=0.5,
                     detach_target=False, backend="triton")
    if DEVICE == "cpu" and triton_backend.interpreting():
        # the interpreter stands behind the reference: `auto` never runs real work in it
        assert backend.priority > registry._REGISTRY["reference"].priority


def test_import_is_cheap():
    """Importing the backend (the registry does, for every LM-head call) must not import triton."""
    code = ("import sys; import define_kernels.lm_head.triton_backend; "
            "sys.exit(1 if 'triton' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
