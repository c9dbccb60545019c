"""define_kernels/table_gradient.py: the map table's gradient without a table-sized zero fill
(csrc/cpu/table_grad.cpp): equal to zeros + index_add for every dtype, repeated ids and empty batches; bad inputs named; the path the
autograd rules take on CPU, and the one `PlainStack` (bench) leaves out."""

import pytest
import torch

from define_kernels import DeFINE, table_gradient
from define_kernels.backends import cpp_library


@pytest.fixture(scope="module", autouse=True)
def built(cpp_extension):
    return cpp_extension


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("n", [300, 40])  # 16-bit: the whole-table and the per-distinct-id sums
def test_equals_zeros_plus_index_add(dtype, id_dtype, n):
    table = torch.randn(1000, 24).to(dtype)
    ids = torch.randint(0, 1000, (n,), dtype=id_dtype)  # repeats: summed per id
    ids[:5] = 999
    grad_rows = torch.randn(n, 24).to(dtype)
    got = cpp_library.table_grad(1000, ids, grad_rows)
    # summed in (at least) fp32 and rounded once to the dtype
    want = torch.zeros(1000, 24, dtype=torch.float64).index_add_(0, ids, grad_rows.double())
    assert got.dtype == dtype and got.shape == table.shape and got.is_contiguous()
    if dtype in (torch.bfloat16, torch.float16):
        sums32 = torch.zeros(1000, 24).index_add_(0, ids, grad_rows.float())
        torch.testing.assert_close(got, sums32.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(got.double(), want, **({} if dtype == torch.float64 else
                                                      dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else
                                                      dict(rtol=1e-2, atol=1e-2)))
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[ids.long()] = False
    assert (got[untouched] == 0).all()


def test_result_is_an_ordinary_tensor():
    """Optimizers and later backward passes write into it in place; it frees with its tensor."""
    got = cpp_library.table_grad(50, torch.tensor([3, 3]), torch.ones(2, 4))
    got.mul_(2).add_(1)
    assert got[3].tolist() == [5.0] * 4 and got[0].tolist() == [1.0] * 4
    assert cpp_library.table_grad(0, torch.tensor([], dtype=torch.long), torch.zeros(0, 4)).shape == (0, 4)


@pytest.mark.parametrize("args, match", [
    ((torch.ones(3), torch.tensor([0, 1, 2]), 10), "grad_rows"),
    ((torch.ones(3, 2), torch.tensor([0, 1]), 10), "ids"),
    ((torch.ones(2, 2), torch.tensor([0.0, 1.0]), 10), "ids"),
    ((torch.ones(2, 2), torch.tensor([0, 10]), 10), "ids"),
    ((torch.ones(2, 2), torch.tensor([-1, 0]), 10), "ids"),
    ((torch.ones(2, 2), torch.tensor([0, 1]), -1), "num_rows"),
    ((torch.ones(2, 2, dtype=torch.long), torch.tensor([0, 1]), 10), "grad_rows"),
])
def test_bad_inputs_are_named(args, match):
    with pytest.raises((ValueError, IndexError), match=match):
        torch.ops.define_kernels_C.table_grad(*args)


def test_gather_rows_gradient_matches_index_select():
    """table_gradient.gather_rows (the module's dedup gather and the autocast gather) differentiates like
    index_select, for a contiguous and a strided x."""
    for x in (torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 12, dtype=torch.float64)[:, ::2]):
        x.requires_grad_()
        ids = torch.randint(0, 40, (90,))
        g = torch.randn(90, 6, dtype=torch.float64)
        (got,) = torch.autograd.grad(table_gradient.gather_rows(x, ids), x, g)
        (want,) = torch.autograd.grad(x.index_select(0, ids), x, g)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activations", ["recompute", "save"])
def test_module_gradient_matches_the_reference_backend(activations):
    """The autograd rule's table gradient on CPU (this path) equals the torch backend's."""
    torch.manual_seed(0)
    model = DeFINE(500, 12, map_dim=16, expand_dim=32, depth=2, max_groups=2, backend="cpu_cpp",
                   activations=activations, cache=False).double()
    ids = torch.randint(0, 500, (4, 30))
    model(ids).pow(2).sum().backward()
    got = model.map_weight.grad.clone()
    model.zero_grad()
    model.hgt.backend = "torch"
    model(ids).pow(2).sum().backward()
    torch.testing.assert_close(got, model.map_weight.grad)


def test_backward_without_output_gradient_fills_nothing():
    """With the save policy only y gets a gradient; the saved activations get none (no zero
    fill per saved tensor), and a y that reaches the loss through nothing still works."""
    model = DeFINE(50, 8, map_dim=8, expand_dim=16, depth=2, max_groups=2, backend="cpu_cpp",
                   activations="save", cache=False)
    y = model(torch.tensor([1, 2, 3]))
    (y.sum() * 0).backward()
    assert model.map_weight.grad is not None and model.map_weight.grad.abs().sum() == 0
