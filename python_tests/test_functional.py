"""define_kernels/functional.py and autocast.py: the activation policies ("recompute" / "save")
through the public op and the modules, on every backend that runs here; autocast (CPU) against
an fp32 run; opcheck of the saving ops."""
import pytest
import torch

import define_kernels as dk
from define_kernels import backends, functional, ops, reference
from define_kernels.backends import BackendUnavailableError
from define_kernels.backends import registry as backend_registry
from tolerances import ATOL, RTOL, assert_close

CONFIGS = {
    "define-shuffle-dropout": dk.HGTConfig(16, 40, 12, 3, 4, align=4, shuffle=True, dropout=0.3),
    "define_nomix": dk.HGTConfig(16, 40, 12, 2, 4, transform="define_nomix", act="relu"),
    "hgt-silu-nonorm": dk.HGTConfig(16, 40, 12, 3, 4, transform="hgt", act="silu", norm=None),
    "glt-noact": dk.HGTConfig(16, 40, 12, 2, 4, transform="glt", shuffle=True, act=None),
    "linear-odd": dk.HGTConfig(12, 37, 7, 3, 1, transform="linear", align=1, reduce_norm=False),
    # no norm, no act: the reference's saved rows are its outputs (must not alias them)
    "hgt-plain": dk.HGTConfig(12, 40, 20, 3, 4, transform="hgt", norm=None, act=None),
}
BACKENDS = [name for name in ("torch", "cpu_cpp") if name in dk.available_backends()]


def make_inputs(config, dtype=torch.float64, vocab=23, rows=31):
    params = [(torch.randn(s, dtype=dtype) * 0.4 + (1.0 if len(s) == 1 else 0.0)).requires_grad_()
              for s in config.param_shapes()]
    x = torch.randn(vocab, config.in_dim, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, vocab, (rows,))
    return x, ids, params


def run(config, x, ids, params, backend, policy, seed=None):
    y = functional.hgt(x, params, config, ids=ids, scale=1.3, seed=seed, backend=backend, activations=policy)
    grads = torch.autograd.grad(y, [x] + params, torch.ones_like(y) + torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape) % 3)
    return [y] + list(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_policy_matches_recompute_forward_and_every_gradient(backend, name):
    config = CONFIGS[name]
    x, ids, params = make_inputs(config)
    seed = torch.tensor(321) if config.dropout else None
    saved = run(config, x, ids, params, backend, "save", seed)
    recomputed = run(config, x, ids, params, "torch", "recompute", seed)
    for index, (a, b) in enumerate(zip(saved, recomputed)):
        assert_close(a, b, name=f"{backend} save vs reference recompute, output {index}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_policy_gradcheck(backend):
    config = dk.HGTConfig(8, 16, 6, 2, 2, align=2, shuffle=True, dropout=0.25)
    x, _, params = make_inputs(config, vocab=7)
    ids = torch.tensor([0, 6, 3, 3, 5])
    seed = torch.tensor(42)

    def fn(x, *params):
        return functional.hgt(x, list(params), config, ids=ids, scale=1.3, seed=seed, backend=backend,
                       activations="save")

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


def test_save_runs_the_saving_op_only_when_grad_is_needed(monkeypatch):
    config = CONFIGS["define_nomix"]
    x, ids, params = make_inputs(config)
    calls = []
    original = backends._REGISTRY["torch"].forward_saving
    monkeypatch.setitem(backends._REGISTRY, "torch", backends._REGISTRY["torch"].__class__(
        **{**backends._REGISTRY["torch"].__dict__,
           "forward_saving": lambda *a: calls.append(1) or original(*a)}))
    functional.hgt(x, params, config, ids=ids, backend="torch", activations="save")
    assert calls == [1]
    with torch.no_grad():
        functional.hgt(x, params, config, ids=ids, backend="torch", activations="save")
    assert calls == [1]


def test_backend_without_save_declines_with_a_reason(monkeypatch):
    recompute_only = backends.Backend("recompute_only", 1, ("cpu",), (torch.float64,),
                                      reference.hgt_forward, backends._REGISTRY["torch"].backward)
    monkeypatch.setitem(backends._REGISTRY, "recompute_only", recompute_only)
    config = CONFIGS["define_nomix"]
    x, ids, params = make_inputs(config)
    with pytest.raises(BackendUnavailableError, match="activation policy 'save' not supported"):
        functional.hgt(x, params, config, ids=ids, backend="recompute_only", activations="save")
    functional.hgt(x, params, config, ids=ids, backend="recompute_only", activations="recompute")
    # auto skips it for "save" (priority 1 would win otherwise) and picks it for "recompute".
    # activations="auto" with a backend that cannot save: recompute, no error.
    functional.hgt(x, params, config, ids=ids, backend="recompute_only")
    inputs = backends.OpInputs(x, ids, params, config, 1.0, None)
    assert backends.select("auto", inputs, "save").name != "recompute_only"
    assert backends.select("auto", inputs, "recompute").name == "recompute_only"


def test_bad_policy_names_the_argument():
    config = CONFIGS["define_nomix"]
    x, ids, params = make_inputs(config)
    with pytest.raises(ValueError, match="activations"):
        functional.hgt(x, params, config, ids=ids, activations="keep")
    with pytest.raises(ValueError, match="activations"):
        dk.DeFINE(10, 8, map_dim=8, expand_dim=16, depth=2, max_groups=2, activations="keep")


@pytest.mark.parametrize("with_ids", [False, True], ids=["dense", "ids"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_saving_ops(with_ids, requires_grad):
    config = CONFIGS["define-shuffle-dropout"]
    x, ids, params = make_inputs(config, torch.float32)
    if not with_ids:
        x, ids = torch.randn(9, config.in_dim), None
    x = x.detach().requires_grad_(requires_grad)
    params = [p.detach().requires_grad_(requires_grad) for p in params]
    args = (x, ids, params, config.key, 1.5, torch.tensor(11), "auto")
    torch.library.opcheck(ops.hgt_forward_saving, args)
    y, saved = ops.hgt_forward_saving(*args)
    grad_y = torch.randn_like(y)
    torch.library.opcheck(ops.hgt_backward_saved, (grad_y, x.detach(), ids, [p.detach() for p in params],
                                                   saved, config.key, 1.5, torch.tensor(11), "auto"))


def test_module_policy_kwarg_passes_through():
    torch.manual_seed(0)
    runs = {}
    for policy in ("recompute", "save"):
        torch.manual_seed(0)
        model = dk.DeFINE(30, 8, map_dim=8, expand_dim=16, depth=2, max_groups=2, dropout=0.2,
                          activations=policy, backend="torch")
        assert model.hgt.activations == policy
        ids = torch.randint(0, 30, (4, 5))
        torch.manual_seed(1)
        model(ids).square().sum().backward()
        runs[policy] = [p.grad for p in model.parameters()]
    for a, b in zip(runs["save"], runs["recompute"]):
        assert_close(a, b, name="module grad")


# --------------------------------------------------------------------------- autocast
def _bf16_close(actual, expected, name):
    torch.testing.assert_close(actual.double(), expected.double(), atol=ATOL[torch.bfloat16],
                               rtol=RTOL[torch.bfloat16], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["recompute", "save"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_autocast_bf16_forward_and_grads_vs_fp32(backend, policy, dropout):
    config = dk.HGTConfig(16, 40, 12, 2, 4, align=4, shuffle=True, dropout=dropout)
    x, ids, params = make_inputs(config, torch.float32)
    x.data.mul_(0.5)
    seed = torch.tensor(5) if dropout else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = functional.hgt(x, params, config, ids=ids, seed=seed, backend=backend, activations=policy)
    assert y.dtype == torch.bfloat16
    grad_y = torch.randn(y.shape) * 0.1
    grads = torch.autograd.grad(y, [x] + params, grad_y.to(y.dtype))
    assert all(g.dtype == torch.float32 for g in grads)
    y32 = functional.hgt(x, params, config, ids=ids, seed=seed, backend=backend, activations=policy)
    grads32 = torch.autograd.grad(y32, [x] + params, grad_y)
    _bf16_close(y, y32, "y")
    for index, (a, b) in enumerate(zip(grads, grads32)):
        scale = b.abs().max().clamp(min=1.0)  # bf16 tolerance relative to the gradient's size
        _bf16_close(a / scale, b / scale, f"grad {index}")


def test_autocast_module_and_tied_output():
    model = dk.DeFINE(50, 16, map_dim=8, expand_dim=32, depth=2, max_groups=2)
    head = dk.relatives.TiedOutput(model)
    ids = torch.randint(0, 50, (3, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(ids)
        assert h.dtype == torch.bfloat16
        logits = head(h)  # raised "h has dtype torch.bfloat16 but the parameters ..." before
        assert logits.dtype == torch.bfloat16
    (h.float().sum() + logits.float().sum()).backward()
    assert model.map_weight.grad.dtype == torch.float32


@pytest.mark.skipif("cpu_cpp" not in BACKENDS, reason="C++ extension not built (DEFINE_KERNELS_NO_JIT)")
def test_cpu_cpp_declines_fp16_save_and_auto_recomputes():
    config = CONFIGS["define_nomix"]
    x, ids, params = make_inputs(config, torch.float16)
    with pytest.raises(BackendUnavailableError, match="'save' not supported for torch.float16"):
        functional.hgt(x, params, config, ids=ids, backend="cpu_cpp", activations="save")
    y = functional.hgt(x, params, config, ids=ids, backend="cpu_cpp")  # auto policy: recompute for fp16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float16


def test_auto_follows_the_measured_ranking(monkeypatch):
    """A measured ranking for (device, dtype) reorders the measured backends within their places
    in `auto`; other backends and other dtypes keep priority order."""
    monkeypatch.setattr(backend_registry, "measured_ranking", lambda: {"cpu": {"float64": ["cpu_cpp", "torch"]}})
    by_priority = [b.name for b in backends.backends_by_priority()]
    order = [b.name for b in backends.auto_order(torch.device("cpu"), torch.float64)]
    assert order.index("cpu_cpp") < order.index("torch")
    assert [n for n in order if n not in ("cpu_cpp", "torch")] == [n for n in by_priority if n not in ("cpu_cpp", "torch")]
    monkeypatch.setattr(backend_registry, "measured_ranking", lambda: {"cpu": {"float64": ["torch", "cpu_cpp"]}})
    assert [b.name for b in backends.auto_order(torch.device("cpu"), torch.float64)] == by_priority
    assert [b.name for b in backends.auto_order(torch.device("cpu"), torch.float32)] == by_priority


def test_shipped_ranking_names_registered_backends():
    for by_dtype in backends.measured_ranking().values():
        for names in by_dtype.values():
            assert set(names) <= set(backends._REGISTRY), names
