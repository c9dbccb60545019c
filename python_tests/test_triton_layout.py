"""define_kernels/backends/triton_layout.py: host-side tables of the triton backend (no triton
needed): the constexpr layout from the plan, and the packed parameter copies."""
import torch

from define_kernels import contract
from define_kernels.backends import triton_layout
from define_kernels.codes import InputKind
from define_kernels.config import HGTConfig


def _params(config, scale=1.0):
    return [torch.randn(shape) * scale for shape in config.param_shapes()]


def test_two_parameter_lists_keep_their_own_packed_copy():
    """Two modules on the triton backend do not repack each other's parameters every call."""
    config = HGTConfig(8, 16, 6, 2, 2)
    cache = triton_layout.PackedParams()
    first, second = _params(config), _params(config)
    flat_first = cache.get(first)
    flat_second = cache.get(second)
    assert cache.get(first) is flat_first and cache.get(second) is flat_second
    assert torch.equal(flat_first, torch.cat([p.reshape(-1) for p in first]))
    first[0].add_(1.0)  # in place: a new version, so a new copy
    again = cache.get(first)
    assert again is not flat_first and torch.equal(again, torch.cat([p.reshape(-1) for p in first]))


def test_packed_copies_are_bounded():
    config = HGTConfig(8, 16, 6, 2, 2)
    cache = triton_layout.PackedParams(slots=2)
    lists = [_params(config) for _ in range(3)]
    kept = [cache.get(params) for params in lists]
    assert cache.get(lists[2]) is kept[2] and cache.get(lists[1]) is kept[1]
    assert cache.get(lists[0]) is not kept[0]  # the least recently used was dropped


def test_layout_reads_the_plan():
    config = HGTConfig(8, 32, 12, 3, 4, in_proj_from=10, act="silu", norm=None)
    layout = triton_layout.stack_layout(config, save=False)
    plan = contract.plan(config)
    assert layout["IN"] == tuple(layer.in_features for layer in plan.layers)
    assert layout["ACTS"] == tuple(int(layer.act) for layer in plan.layers)
    # the kernels read the in-proj's input as a first layer reads x
    assert layout["KINDS"][0] == int(InputKind.X) and plan.layers[0].kind == InputKind.PROJ
    assert layout["W_OFF"][1] == sum(torch.Size(s).numel() for s in plan.layers[0].param_shapes)
    assert layout["num_params"] == sum(torch.Size(s).numel() for s in plan.param_shapes)
