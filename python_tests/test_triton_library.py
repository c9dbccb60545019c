"""The Triton path as torch.library.triton_op (backends/triton_library.py) against the reference.

Eager: forward and every gradient through the triton_ops (the Triton interpreter on CPU).
Compiled: torch.compile(fullgraph=True) through Inductor must match eager; it needs a GPU,
because torch.library.wrap_triton hands TRITON_INTERPRET=1 kernels (InterpretedFunction) back
unwrapped (torch/_library/triton.py), so no graph can capture them on a CPU.
"""
import pytest
import torch

from define_kernels import backends, reference
from define_kernels.backends import triton_library
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
def test_compiled_fullgraph_matches_eager():
    x, ids, params = _inputs(torch.bfloat16)
    seed = torch.tensor(7, dtype=torch.int64)

    def step(x, params):
        return triton_library.hgt_triton(x, params, CONFIG, ids=ids, scale=1.3, seed=seed).float().square().sum()

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
