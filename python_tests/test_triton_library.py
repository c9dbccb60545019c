"""The Triton path as torch.library.triton_op (backends/triton_library.py) against the reference.

Eager: forward and every gradient through the triton_ops (the Triton interpreter on CPU), and the
public op running them when the triton backend is selected.
Routing under torch.compile (fullgraph=True, so a graph break fails): functional.hgt / DeFINE put the
triton_op into Dynamo's graph where triton runs, the opaque public op elsewhere; checked on CPU
with a recording Dynamo backend that then runs the graph eagerly (the interpreter's launches are
skipped only in Dynamo's fake-tensor pass, triton_library._InterpretedLaunch).
Inductor: needs a GPU, because torch.library.wrap_triton hands TRITON_INTERPRET=1 kernels
(InterpretedFunction) back unwrapped (torch/_library/triton.py), so no graph can capture them on
a CPU.
"""
import pytest
import torch

import define_kernels as dk
from define_kernels import backends, functional, ops, reference
from define_kernels.backends import first_use_check, triton_library
from define_kernels.config import HGTConfig

from conftest import usable_backend
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = HGTConfig(in_dim=12, expand_dim=40, out_dim=20, depth=3, max_groups=4, align=1,
                   shuffle=True, dropout=0.3)


def _inputs(dtype=torch.float32):
    x = torch.randn(23, CONFIG.in_dim, dtype=dtype, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, 23, (13,), device=DEVICE)
    ids[0] = 22
    params = [(torch.randn(shape, dtype=dtype, device=DEVICE) * 0.6).requires_grad_(True)
              for shape in CONFIG.param_shapes()]
    usable_backend("triton", backends.OpInputs(x, ids, params, CONFIG, 1.0, None))
    return x, ids, params


@pytest.mark.parametrize("seed", [None, 12345], ids=["eval", "dropout"])
def test_triton_op_matches_reference(seed):
    x, ids, params = _inputs()
    seed_tensor = None if seed is None else torch.tensor(seed, dtype=torch.int64)
    y = triton_library.hgt_triton(x, params, CONFIG, ids=ids, scale=1.3, seed=seed_tensor)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + params, grad_y)
    wide = [p.detach().double().requires_grad_(True) for p in params]
    x64 = x.detach().double().requires_grad_(True)
    y_ref = reference.hgt_forward(x64, ids, wide, CONFIG, 1.3, seed)
    grads_ref = torch.autograd.grad(y_ref, [x64] + wide, grad_y.double())
    assert_close(y.detach().cpu(), y_ref.detach().cpu(), torch.float32, name="y")
    for index, (grad, grad_ref) in enumerate(zip(grads, grads_ref)):
        size = grad_ref.abs().max().clamp_min(1.0)
        assert_close((grad / size).cpu(), (grad_ref / size).cpu(), torch.float32, name=f"grad[{index}]")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: torch.library.wrap_triton returns TRITON_INTERPRET=1 kernels "
                           "unwrapped (InterpretedFunction), so torch.compile cannot capture them on CPU")
@pytest.mark.parametrize("entry", ["hgt_triton", "public"])
def test_compiled_fullgraph_matches_eager(entry):
    x, ids, params = _inputs(torch.bfloat16)
    seed = torch.tensor(7, dtype=torch.int64)

    def step(x, params):
        if entry == "public":  # routed to the triton_op while tracing (functional.hgt)
            y = functional.hgt(x, params, CONFIG, ids=ids, scale=1.3, seed=seed, backend="triton")
        else:
            y = triton_library.hgt_triton(x, params, CONFIG, ids=ids, scale=1.3, seed=seed)
        return y.float().square().sum()

    compiled = torch.compile(step, fullgraph=True)  # a graph break raises here
    loss = compiled(x, params)
    grads = torch.autograd.grad(loss, [x] + params)
    loss_eager = step(x, params)
    grads_eager = torch.autograd.grad(loss_eager, [x] + params)
    # compiled and eager launch the same kernels: equal up to bf16 rounding of the table's row
    assert_close(loss, loss_eager, dtype=torch.bfloat16, name="compiled loss")
    for index, (grad, grad_eager) in enumerate(zip(grads, grads_eager)):
        size = grad_eager.abs().max().float().clamp_min(1.0)
        assert_close(grad.float() / size, grad_eager.float() / size, dtype=torch.bfloat16,
                     name=f"compiled gradient {index} (scaled)")


def _compile_recording(fn):
    """torch.compile(fn, fullgraph=True) with a Dynamo backend that records each graph's call
    targets and runs the graph eagerly."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return gm.forward

    return torch.compile(fn, backend=record, fullgraph=True), graphs


def test_public_op_runs_the_triton_op(monkeypatch):
    """backend="triton" behind the opaque public op: its forward and backward are the triton_ops."""
    x, ids, params = _inputs()
    calls = []
    for name in ("triton_hgt_forward", "triton_hgt_backward"):
        op = getattr(triton_library, name)
        monkeypatch.setattr(triton_library, name,
                            lambda *args, _op=op, _name=name: calls.append(_name) or _op(*args))
    seed = torch.tensor(12345, dtype=torch.int64)
    y = functional.hgt(x, params, CONFIG, ids=ids, scale=1.3, seed=seed, backend="triton",
                activations="recompute")
    grads = torch.autograd.grad(y.square().sum(), [x] + params)
    assert "triton_hgt_forward" in calls and "triton_hgt_backward" in calls
    y_ref = reference.hgt_forward(x.detach().double(), ids, [p.detach().double() for p in params],
                                  CONFIG, 1.3, 12345)
    assert_close(y.detach().cpu(), y_ref.cpu(), torch.float32, name="y")
    assert all(torch.isfinite(g).all() for g in grads)


def test_compiled_define_routes_to_the_triton_op():
    """A DeFINE training step compiled with fullgraph=True: the graph holds the triton_op (not the
    opaque op) and gives eager's output and gradients (same seed, same dropout masks)."""
    torch.manual_seed(0)
    embed = dk.DeFINE(31, 20, map_dim=12, expand_dim=40, depth=3, max_groups=4, align=1,
                      dropout=0.3, backend="triton", device=DEVICE)
    ids = torch.randint(0, 31, (3, 5), device=DEVICE)
    usable_backend("triton", backends.OpInputs(embed.map_weight, ids.reshape(-1), embed.hgt.op_params(),
                                               embed.config, 1.0, None))

    def step(ids):
        return embed(ids).square().sum()

    compiled, graphs = _compile_recording(step)
    torch.manual_seed(1)
    loss = compiled(ids)
    grads = torch.autograd.grad(loss, list(embed.parameters()))
    assert graphs and any("triton_hgt_forward" in t for t in graphs[0]), graphs
    assert not any(t.startswith("define_kernels.hgt_forward") for t in graphs[0]), graphs
    torch.manual_seed(1)
    loss_eager = step(ids)
    grads_eager = torch.autograd.grad(loss_eager, list(embed.parameters()))
    assert_close(loss.detach(), loss_eager.detach(), torch.float32, name="compiled loss")
    for index, (grad, grad_eager) in enumerate(zip(grads, grads_eager)):
        size = grad_eager.abs().max().clamp_min(1.0)
        assert_close(grad / size, grad_eager / size, torch.float32, name=f"compiled gradient {index}")


def test_compiled_keeps_the_opaque_op_elsewhere(monkeypatch):
    """Another backend, or a demoted triton, keeps the opaque public op in the graph."""
    x, ids, params = _inputs()

    def step(x, backend):
        return functional.hgt(x, params, CONFIG, ids=ids, scale=1.3, backend=backend, activations="recompute")

    compiled, graphs = _compile_recording(lambda x: step(x, "torch"))
    compiled(x)
    assert any(t.startswith("define_kernels.hgt_forward") for t in graphs[0]), graphs
    assert not any("triton_hgt" in t for t in graphs[0]), graphs
    monkeypatch.setitem(first_use_check._demoted, "triton", "injected for this test")
    compiled, graphs = _compile_recording(lambda x: step(x, "triton"))
    with pytest.raises(backends.BackendUnavailableError, match="demoted"):
        compiled(x)  # the opaque op refuses the demoted backend by name, as in eager
    assert any(t.startswith("define_kernels.hgt_forward") for t in graphs[0]), graphs


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter case: on a GPU the kernels are captured")
def test_interpreter_kernels_refuse_a_graph_trace():
    """aot_eager / Inductor trace the triton_op's body into a graph; interpreted kernels cannot be
    in it, and skipping them there would return unwritten outputs: it must raise instead."""
    x, ids, params = _inputs()
    x, params = x.detach(), [p.detach() for p in params]
    compiled = torch.compile(lambda x: functional.hgt(x, params, CONFIG, ids=ids, backend="triton",
                                               activations="recompute"), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="cannot enter a traced graph"):
        compiled(x)
