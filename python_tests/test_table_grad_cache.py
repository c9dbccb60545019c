"""Reuse of the map table's dense gradient buffer (define_kernels/table_grad_cache.py): every
step's gradient equals a fresh one bit for bit, the buffer really is reused when nothing holds it,
and never when something might see the write: a gradient still held, changed in place, or
accumulated into; kept buffers go with their parameter. Also table_grad_into's checks."""

import copy
import gc

import pytest
import torch

from define_kernels import DeFINE, table_grad_cache
from define_kernels.backends import cpp_library


@pytest.fixture(scope="module", autouse=True)
def built(cpp_extension):
    return cpp_extension


@pytest.fixture(autouse=True)
def empty_cache():
    table_grad_cache.clear()
    yield
    table_grad_cache.clear()


def small_model(dtype=torch.float32, **options):
    torch.manual_seed(0)
    return DeFINE(300, 12, map_dim=8, expand_dim=24, depth=2, max_groups=2, backend="cpu_cpp",
                  cache=False, **options).to(dtype)


def backward(model, ids, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(ids)
    y.float().pow(2).sum().backward()


def fresh_grad(model, ids, autocast=False):
    """The same backward on a copy of the model: its first, so into a freshly allocated buffer."""
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    backward(twin, ids, autocast)
    return twin.map_weight.grad


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.float32, True)])
@pytest.mark.parametrize("dedup", [True, False])
def test_each_step_equals_a_fresh_buffer_and_reuses_it(dtype, autocast, dedup):
    model = small_model(dtype, dedup=dedup)
    pointers = []
    for step in range(4):
        ids = torch.randint(0, 300, (3, 17 + step))  # different rows (and counts) every step
        backward(model, ids, autocast)
        got = model.map_weight.grad
        pointers.append(got.data_ptr())
        want = fresh_grad(model, ids, autocast)
        assert got.dtype == model.map_weight.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        del got  # held, it could not be reused
        model.zero_grad(set_to_none=True)
    assert len(set(pointers)) == 1, "the buffer was not reused"


def test_a_held_gradient_is_never_written():
    model = small_model()
    backward(model, torch.tensor([1, 2, 3]))
    held = model.map_weight.grad
    copy = held.clone()
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([3, 4, 5])
    backward(model, ids)
    torch.testing.assert_close(held, copy, rtol=0, atol=0)
    assert model.map_weight.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(model.map_weight.grad, fresh_grad(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("change", ["mul_", "add_", "fill_row"])
def test_a_gradient_changed_in_place_is_not_reused(change):
    """add_ makes every row non-zero: reusing the buffer would leak them into the next step."""
    model = small_model()
    backward(model, torch.tensor([1, 2, 3]))
    grad = model.map_weight.grad
    if change == "mul_":
        grad.mul_(0.5)
    elif change == "add_":
        grad.add_(1.0)
    else:
        grad[200].fill_(7.0)
    pointer = grad.data_ptr()
    del grad
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([5, 6])
    backward(model, ids)
    assert model.map_weight.grad.data_ptr() != pointer
    torch.testing.assert_close(model.map_weight.grad, fresh_grad(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("set_to_none", [False, True])
def test_accumulation_across_steps(set_to_none):
    """Without zero_grad, autograd adds each step into .grad; with zero_grad(set_to_none=False)
    the held .grad is zeroed in place and added into. Both give the sums of fresh gradients."""
    model = small_model()
    batches = [torch.randint(0, 300, (20,)) for _ in range(4)]
    fresh = [fresh_grad(model, ids) for ids in batches]
    backward(model, batches[0])
    backward(model, batches[1])
    torch.testing.assert_close(model.map_weight.grad, fresh[0] + fresh[1], rtol=0, atol=1e-6)
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad(set_to_none=set_to_none)
    backward(model, batches[2])
    backward(model, batches[3])
    torch.testing.assert_close(model.map_weight.grad, fresh[2] + fresh[3], rtol=0, atol=1e-6)


def test_training_with_an_optimizer_matches_fresh_buffers():
    def train(reuse):
        model = small_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        for _ in range(5):
            if not reuse:
                table_grad_cache.clear()
            backward(model, torch.randint(0, 300, (2, 25)))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # scales the gradient in place
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return model.map_weight.detach().clone()
    torch.testing.assert_close(train(True), train(False), rtol=0, atol=0)


def test_kept_buffers_go_with_their_parameter():
    model = small_model()
    backward(model, torch.tensor([1, 2]))
    model.zero_grad(set_to_none=True)
    assert len(table_grad_cache._buffers) == 1
    del model
    gc.collect()
    assert len(table_grad_cache._buffers) == 0


def test_not_used_for_tables_that_are_not_leaf_parameters():
    """The dedup expansion's gather (x = the stack's rows) and grad-mode backward get fresh
    buffers; nothing is kept for them."""
    model = small_model()
    ids = torch.randint(0, 300, (40,))
    backward(model, ids)  # only the map table is kept
    assert list(table_grad_cache._buffers.keys()) == [model.map_weight]
    x = torch.randn(30, 6, requires_grad=True)
    y = (x * 2).index_select(0, torch.tensor([0, 1]))
    assert table_grad_cache.dense_grad(x * 2, torch.tensor([0, 1]), torch.ones(2, 6)) is None
    with torch.enable_grad():
        assert table_grad_cache.dense_grad(x, torch.tensor([0, 1]), torch.ones(2, 6)) is None
    del y


@pytest.mark.parametrize("table, grad_rows, ids, match", [
    (torch.zeros(10, 4)[:, :2], torch.ones(2, 2), torch.tensor([0, 1]), "table"),
    (torch.zeros(10, 4, dtype=torch.float64), torch.ones(2, 4), torch.tensor([0, 1]), "table"),
    (torch.zeros(10, 4), torch.ones(2, 3), torch.tensor([0, 1]), "grad_rows"),
    (torch.zeros(10, 4), torch.ones(2, 4), torch.tensor([0, 10]), "ids"),
    (torch.zeros(10, 4), torch.ones(2, 4), torch.tensor([0]), "ids"),
])
def test_table_grad_into_bad_inputs_are_named(table, grad_rows, ids, match):
    with pytest.raises((ValueError, IndexError), match=match):
        torch.ops.define_kernels_C.table_grad_into(table, grad_rows, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_grad_into_adds(dtype):
    table = torch.randn(50, 8).to(dtype)
    # 16-bit: one rounding of table + sum per id, so distinct ids for a bitwise comparison
    ids = torch.tensor([3, 3, 7]) if dtype == torch.float32 else torch.tensor([3, 9, 7])
    rows = torch.randn(3, 8).to(dtype)
    want = table.float().index_add_(0, ids, rows.float()).to(dtype)
    assert cpp_library.table_grad_into(table, ids, rows)
    torch.testing.assert_close(table, want, rtol=0, atol=0)


def test_opcheck():
    """Schemas (table_grad_into mutates only `table`), fake kernels and dispatch of both ops."""
    ids, rows = torch.tensor([3, 3, 7]), torch.randn(3, 8)
    torch.library.opcheck(torch.ops.define_kernels_C.table_grad_into.default, (torch.zeros(50, 8), rows, ids))
    torch.library.opcheck(torch.ops.define_kernels_C.table_grad.default, (rows, ids, 50))
