"""torch.library.opcheck on the public ops: schema, fake, autograd registration, AOT dispatch."""
import pytest
import torch

from define_kernels import HGTConfig, ops

CONFIGS = [HGTConfig(8, 24, 6, 2, 2, align=2), HGTConfig(8, 24, 6, 2, 2, shuffle=True, dropout=0.2)]


def sample_args(config, requires_grad, with_ids, dtype=torch.float32):
    params = [torch.randn(s, dtype=dtype, requires_grad=requires_grad) for s in config.param_shapes()]
    seed = torch.tensor(11) if config.dropout else None
    if with_ids:
        x = torch.randn(9, 8, dtype=dtype, requires_grad=requires_grad)
        ids = torch.tensor([8, 0, 3, 3])
    else:
        x, ids = torch.randn(5, 8, dtype=dtype, requires_grad=requires_grad), None
    return x, ids, params, config.key, 1.5, seed, "auto"


@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "shuffle-dropout"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_ids", [False, True], ids=["dense", "ids"])
def test_opcheck_forward(config, requires_grad, with_ids):
    torch.library.opcheck(ops.hgt_forward, sample_args(config, requires_grad, with_ids))


@pytest.mark.parametrize("with_ids", [False, True], ids=["dense", "ids"])
def test_opcheck_backward(with_ids):
    x, ids, params, key, scale, seed, backend = sample_args(CONFIGS[1], False, with_ids)
    grad_y = torch.randn(x.shape[0] if ids is None else ids.shape[0], 6)
    torch.library.opcheck(ops.hgt_backward, (grad_y, x, ids, params, key, scale, seed, backend))


def test_backward_op_matches_autograd_of_the_forward_op():
    x, ids, params, key, scale, seed, backend = sample_args(CONFIGS[1], True, True, torch.float64)
    y = ops.hgt_forward(x, ids, params, key, scale, seed, backend)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + params, grad_y)
    grad_rows, grad_params = ops.hgt_backward(grad_y, x, ids, params, key, scale, seed, backend)
    assert torch.allclose(grads[0], torch.zeros_like(x).index_add_(0, ids, grad_rows))
    for got, expected in zip(grad_params, grads[1:]):
        assert torch.allclose(got, expected)
