"""The CPU backend's buffer pool (csrc/cpu/buffer_pool.h, define_kernels.cpu_buffer_pool): a
buffer is handed out again only when nothing holds it (tensors, views, a Python storage object),
steps reuse their buffers instead of growing the pool, results do not depend on the pool, and
the limit and clear() behave as documented."""
import pytest
import torch

from define_kernels import cpu_buffer_pool
from define_kernels.backends import cpp_ext
from define_kernels.config import HGTConfig

CONFIG = HGTConfig(16, 40, 12, 3, 4, align=4)
DEFAULT_LIMIT = 512 << 20


@pytest.fixture(autouse=True)
def pool(cpp_extension):
    cpu_buffer_pool.set_limit(DEFAULT_LIMIT)
    cpu_buffer_pool.clear()
    yield
    cpu_buffer_pool.set_limit(DEFAULT_LIMIT)


def make_inputs(rows=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator) * 0.3 for s in CONFIG.param_shapes()]
    x = torch.randn(50, CONFIG.in_dim, generator=generator)
    ids = torch.randint(0, 50, (rows,), generator=generator)
    grad_y = torch.randn(rows, CONFIG.out_dim, generator=generator)
    return x, ids, params, grad_y


def step(x, ids, params, grad_y):
    _, saved = cpp_ext.forward_saving(x, ids, params, CONFIG, 0.8, None)
    return cpp_ext.backward_saved(grad_y, x, ids, params, saved, CONFIG, 0.8, None)


def test_steps_reuse_their_buffers():
    inputs = make_inputs()
    step(*inputs)
    held = cpu_buffer_pool.held_bytes()
    assert held > 0
    for _ in range(5):
        step(*inputs)
    assert cpu_buffer_pool.held_bytes() == held


@pytest.mark.parametrize("hold", ["tensor", "view", "storage"])
def test_a_held_buffer_is_never_written(hold):
    x, ids, params, _ = make_inputs()
    _, saved = cpp_ext.forward_saving(x, ids, params, CONFIG, 0.8, None)
    kept = {"tensor": lambda t: t, "view": lambda t: t[1:, 2:], "storage": lambda t: t.untyped_storage()}[hold](saved[2])
    before = bytes(kept.untyped_storage() if hold != "storage" else kept)
    del saved
    for seed in range(1, 4):  # other inputs, so a reused buffer would get other values
        cpp_ext.forward_saving(*make_inputs(seed=seed)[:3], CONFIG, 0.8, None)
    assert bytes(kept.untyped_storage() if hold != "storage" else kept) == before


def test_results_do_not_depend_on_the_pool():
    inputs = make_inputs(rows=257)
    cpu_buffer_pool.set_limit(0)
    want = step(*inputs)
    cpu_buffer_pool.set_limit(DEFAULT_LIMIT)
    step(*make_inputs(rows=257, seed=5))  # leaves buffers with other contents in the pool
    got = step(*inputs)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a, b)


def test_two_graphs_alive_at_once():
    """Gradient accumulation: a second forward while the first's activations are still saved."""
    x, ids, params, grad_y = make_inputs()
    first = cpp_ext.forward_saving(x, ids, params, CONFIG, 0.8, None)[1]
    second_x = x * 1.5
    second = cpp_ext.forward_saving(second_x, ids, params, CONFIG, 0.8, None)[1]
    got = [cpp_ext.backward_saved(grad_y, x, ids, params, first, CONFIG, 0.8, None),
           cpp_ext.backward_saved(grad_y, second_x, ids, params, second, CONFIG, 0.8, None)]
    cpu_buffer_pool.set_limit(0)
    want = [step(x, ids, params, grad_y), step(second_x, ids, params, grad_y)]
    for g, w in zip(got, want):
        assert torch.equal(g[0], w[0])


def test_limit_and_clear():
    inputs = make_inputs()
    step(*inputs)
    assert cpu_buffer_pool.held_bytes() > 0
    cpu_buffer_pool.clear()
    assert cpu_buffer_pool.held_bytes() == 0
    _, saved = cpp_ext.forward_saving(*inputs[:3], CONFIG, 0.8, None)
    in_use = cpu_buffer_pool.held_bytes()
    cpu_buffer_pool.clear()  # the saved tensors keep theirs
    assert 0 < cpu_buffer_pool.held_bytes() <= in_use
    del saved
    cpu_buffer_pool.set_limit(0)  # releases the free buffers and stops pooling
    assert cpu_buffer_pool.held_bytes() == 0
    step(*inputs)
    assert cpu_buffer_pool.held_bytes() == 0
    with pytest.raises(ValueError, match="bytes"):
        cpu_buffer_pool.set_limit(-1)


def test_module_training_steps_reuse_their_buffers():
    """Through the module and autograd (whose Python side looks at the saved tensors' storages)."""
    from define_kernels import DeFINE
    torch.manual_seed(0)
    model = DeFINE(500, 32, map_dim=16, expand_dim=48, depth=3, max_groups=4, backend="cpu_cpp", activations="save",
                   cache=False)
    ids = torch.randint(0, 500, (4, 60))
    for index in range(4):
        model(ids).sum().backward()
        model.zero_grad(set_to_none=True)
        if index == 1:
            held = cpu_buffer_pool.held_bytes()
    assert cpu_buffer_pool.held_bytes() == held > 0
