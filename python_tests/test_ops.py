"""torch.library.opcheck on the public ops: schema, fake, autograd registration, AOT dispatch,
on the reference and on a non-reference backend (cpu_cpp), which is also compared with the
reference's values and gradients."""
import pytest
import torch

from define_kernels import HGTConfig, backends, ops

from conftest import usable_backend
from tolerances import assert_close

OP_BACKENDS = ["torch", "cpu_cpp"]

CONFIGS = [HGTConfig(8, 24, 6, 2, 2, align=2), HGTConfig(8, 24, 6, 2, 2, shuffle=True, dropout=0.2)]


def sample_args(config, requires_grad, with_ids, dtype=torch.float32, backend="auto"):
    params = [torch.randn(s, dtype=dtype, requires_grad=requires_grad) for s in config.param_shapes()]
    seed = torch.tensor(11) if config.dropout else None
    if with_ids:
        x = torch.randn(9, 8, dtype=dtype, requires_grad=requires_grad)
        ids = torch.tensor([8, 0, 3, 3])
    else:
        x, ids = torch.randn(5, 8, dtype=dtype, requires_grad=requires_grad), None
    if backend != "auto":
        usable_backend(backend, backends.OpInputs(x, ids, params, config, 1.5, None))
    return x, ids, params, config.key, 1.5, seed, backend


@pytest.mark.parametrize("op_backend", OP_BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "shuffle-dropout"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_ids", [False, True], ids=["dense", "ids"])
def test_opcheck_forward(config, requires_grad, with_ids, op_backend):
    torch.library.opcheck(ops.hgt_forward, sample_args(config, requires_grad, with_ids, backend=op_backend))


@pytest.mark.parametrize("op_backend", OP_BACKENDS)
@pytest.mark.parametrize("with_ids", [False, True], ids=["dense", "ids"])
def test_opcheck_backward(with_ids, op_backend):
    x, ids, params, key, scale, seed, backend = sample_args(CONFIGS[1], False, with_ids, backend=op_backend)
    grad_y = torch.randn(x.shape[0] if ids is None else ids.shape[0], 6)
    torch.library.opcheck(ops.hgt_backward, (grad_y, x, ids, params, key, scale, seed, backend))


@pytest.mark.parametrize("op_backend", OP_BACKENDS)
def test_backward_op_matches_autograd_of_the_forward_op(op_backend):
    x, ids, params, key, scale, seed, backend = sample_args(CONFIGS[1], True, True, torch.float64, op_backend)
    y = ops.hgt_forward(x, ids, params, key, scale, seed, backend)
    y_ref = ops.hgt_forward(x, ids, params, key, scale, seed, "torch")
    assert_close(y, y_ref, name=f"{op_backend} forward vs the reference")
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + params, grad_y)
    grad_rows, grad_params = ops.hgt_backward(grad_y, x, ids, params, key, scale, seed, backend)
    assert_close(grads[0], torch.zeros_like(x).index_add_(0, ids, grad_rows), name="table gradient")
    for index, (got, expected) in enumerate(zip(grad_params, grads[1:])):
        assert_close(got, expected, name=f"backward op vs autograd: params[{index}]")
    grads_ref = torch.autograd.grad(y_ref, [x] + params, grad_y)
    for index, (got, expected) in enumerate(zip(grads, grads_ref)):
        assert_close(got, expected, name=f"{op_backend} gradient {index} vs the reference")
