"""reference.py against an independent, naive reading of docs/math.md §2, in float64.

The naive form uses explicit index lists for mix/concat/shuffle, one nn.Linear per group, a
hand-written LayerNorm and activations, and the dropout hash in plain Python integers.
"""
import itertools
import math

import pytest
import torch
from torch import nn

from define_kernels import HGT, DeFINE, HGTConfig, backends, functional, hgt, reference
from conftest import usable_backend
from plain_dropout_hash import draw24
from tolerances import assert_close

# ------------------------------------------------------------------------- naive reading of docs/math.md


def naive_keep(seed, layer, row_key, feature, p):
    return draw24(seed, layer, row_key, feature) >= int(p * 2**24)


def naive_input_indices(kind, p, prev_width, groups):
    """Positions in [x, h] (x first) that form u, in order."""
    if kind == "x":
        return list(range(p))
    if kind == "prev":
        return [p + i for i in range(prev_width)]
    if kind == "concat":
        return list(range(p + prev_width))
    xc, hc = p // groups, prev_width // groups
    order = []
    for j in range(groups):
        order += [j * xc + i for i in range(xc)] + [p + j * hc + i for i in range(hc)]
    return order


def naive_act(v, act):
    if act == "gelu":
        return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))
    if act == "relu":
        return torch.where(v > 0, v, torch.zeros_like(v))
    if act == "silu":
        return v / (1 + torch.exp(-v))
    return v


def naive_forward(x, params, config, seed=None, row_keys=None):
    per_layer = reference.split_params(params, config)
    p, h = config.in_dim, x.new_zeros(x.shape[0], 0)
    for index, (layer, (weight, bias, ln_w, ln_b)) in enumerate(zip(config.layers, per_layer)):
        g, a, w = layer.groups, layer.in_features, layer.out_features
        u = torch.cat([x, h], dim=1)[:, naive_input_indices(layer.input_kind, p, h.shape[1], g)]
        assert u.shape[1] == a
        pieces = []
        for j in range(g):
            linear = nn.Linear(a // g, w // g).double()
            linear.weight.data, linear.bias.data = weight[j].t(), bias[j]
            pieces.append(linear(u[:, j * (a // g):(j + 1) * (a // g)]))
        z = torch.cat(pieces, dim=1)
        c = w // g
        if config.shuffle:  # position (group j, feature i) moves to flat i * g + j
            shuffled = torch.empty_like(z)
            for j, i in itertools.product(range(g), range(c)):
                shuffled[:, i * g + j] = z[:, j * c + i]
            z = shuffled
        if ln_w is not None:
            chunks = []
            for j in range(g):
                chunk = z[:, j * c:(j + 1) * c]
                mean = chunk.mean(dim=1, keepdim=True)
                var = ((chunk - mean) ** 2).mean(dim=1, keepdim=True)
                chunks.append((chunk - mean) / torch.sqrt(var + 1e-5) * ln_w + ln_b)
            z = torch.cat(chunks, dim=1)
        z = naive_act(z, config.layer_act(index))
        if seed is not None and config.dropout > 0:
            keep = torch.tensor([[naive_keep(seed, index, int(key), f, config.dropout) for f in range(w)]
                                 for key in row_keys], dtype=z.dtype)
            z = z * keep / (1 - config.dropout)
        h = z
    return h


def random_params(config, dtype=torch.float64):
    """Non-trivial values everywhere (biases and LN affine too), unlike the module's init."""
    return [torch.randn(shape, dtype=dtype) * (0.5 if len(shape) == 3 else 1.0)
            for shape in config.param_shapes()]


CONFIGS = [
    dict(transform=transform, group_rule=rule, shuffle=shuffle)
    for transform in ("define", "define_nomix", "hgt", "glt", "linear")
    for rule in ("halve", "cycle")
    for shuffle in (False, True)
] + [
    dict(norm=None, act=None),
    dict(norm=None, act="relu", shuffle=True),
    dict(act="silu", reduce_norm=False, reduce_act=False),
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_reference_matches_naive_float64(options):
    # Odd widths: p=12, per-group widths 7, 20, ... (align 1), depth 3 so cycle differs from halve.
    config = HGTConfig(12, 40, 13, 3, 4, align=1, **options)
    x = torch.randn(5, 12, dtype=torch.float64)
    params = random_params(config)
    assert_close(reference.hgt_forward(x, None, params, config), naive_forward(x, params, config),
                 name="y")


@pytest.mark.parametrize("transform", ["define", "hgt", "define_nomix"])
def test_reference_dropout_matches_naive_hash(transform):
    config = HGTConfig(8, 24, 6, 2, 2, align=2, dropout=0.3, transform=transform, shuffle=True)
    table = torch.randn(30, 8, dtype=torch.float64)
    ids = torch.tensor([29, 3, 3, 0, 17])
    params = random_params(config)
    expected = naive_forward(table[ids] * 2.0, params, config, seed=1234, row_keys=ids)
    actual = reference.hgt_forward(table, ids, params, config, scale=2.0, seed=1234)
    assert_close(actual, expected, name="y with dropout")
    kept = (actual != 0).float().mean().item()
    assert 0.5 < kept < 0.9, f"keep rate {kept} far from 0.7"


def test_dropout_mask_is_keyed_by_token_not_position():
    keep = reference.dropout_keep_mask(7, 2, torch.tensor([5, 9, 5]), 64, 0.5)
    assert torch.equal(keep[0], keep[2]) and not torch.equal(keep[0], keep[1])
    other_seed = reference.dropout_keep_mask(8, 2, torch.tensor([5]), 64, 0.5)
    other_layer = reference.dropout_keep_mask(7, 3, torch.tensor([5]), 64, 0.5)
    assert not torch.equal(keep[0], other_seed[0]) and not torch.equal(keep[0], other_layer[0])


def test_gather_and_scale_equal_dense_rows():
    config = HGTConfig(8, 24, 6, 2, 2)
    table = torch.randn(11, 8, dtype=torch.float64)
    ids = torch.tensor([10, 0, 4, 4])
    params = random_params(config)
    assert_close(reference.hgt_forward(table, ids, params, config, scale=3.0),
                 reference.hgt_forward(table[ids] * 3.0, None, params, config), name="y")


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gradcheck_through_op_dense_and_gathered(dropout):
    config = HGTConfig(8, 24, 6, 2, 2, align=2, dropout=dropout, shuffle=True)
    params = [p.requires_grad_() for p in random_params(config)]
    seed = torch.tensor(99) if dropout else None
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, *ps: hgt(x, list(ps), config, seed=seed), (x, *params))
    table = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([5, 1, 1, 0])
    torch.autograd.gradcheck(
        lambda t, *ps: hgt(t, list(ps), config, ids=ids, scale=1.5, seed=seed), (table, *params))


def test_gradcheck_through_modules():
    model = DeFINE(9, 5, map_dim=4, expand_dim=12, depth=2, max_groups=2, align=2,
                   padding_idx=2, in_proj_dim=None).double()
    ids = torch.tensor([[0, 2, 8], [8, 3, 3]])
    names = [name for name, _ in model.named_parameters()]

    def run(*values):
        return torch.func.functional_call(model, dict(zip(names, values)), (ids,))

    torch.autograd.gradcheck(run, tuple(p.detach().clone().requires_grad_() for p in model.parameters()))
    hgt_module = HGT(HGTConfig(4, 12, 5, 2, 2, align=2, act="silu")).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(hgt_module, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_runs_in_low_precision(dtype):
    config = HGTConfig(8, 24, 6, 2, 2)
    params64 = random_params(config)
    x = torch.randn(7, 8, dtype=torch.float64)
    exact = reference.hgt_forward(x, None, params64, config)
    y = reference.hgt_forward(x.to(dtype), None, [p.to(dtype) for p in params64], config)
    assert y.dtype == dtype
    # Loose sanity bound only: this is the yardstick the backends' low-precision checks use.
    assert (y.double() - exact).abs().max() < {torch.float32: 1e-4, torch.float16: 0.1, torch.bfloat16: 0.5}[dtype]


# ------------------------------------------------------------------------------ dropout boundary
def boundary_case(config_options, row_key, feature, seed=12345):
    """(config, p): p chosen from the hash so that the draw of (last layer, row_key, feature)
    equals the keep threshold int(p * 2^24) exactly: kept under `draw >= threshold`, dropped
    under `draw > threshold`."""
    depth = config_options["depth"]
    draw = draw24(seed, depth, row_key, feature)
    p = draw / 2**24  # exact: draw < 2^24
    assert reference.dropout_threshold(p) == draw
    return HGTConfig(**config_options, dropout=p), p


@pytest.mark.parametrize("gather", [True, False], ids=["ids", "dense"])
def test_dropout_keeps_a_draw_equal_to_the_threshold(backend, gather):
    options = dict(in_dim=8, expand_dim=16, out_dim=6, depth=2, max_groups=2, act=None, align=2)
    row_key, feature, seed = 5, 3, 12345
    config, p = boundary_case(options, row_key, feature, seed)
    generator = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=generator, dtype=torch.float64) * 0.5 for s in config.param_shapes()]
    if gather:
        x, ids, row = torch.randn(9, 8, generator=generator, dtype=torch.float64), torch.tensor([2, row_key, 7]), 1
    else:
        x, ids, row = torch.randn(row_key + 2, 8, generator=generator, dtype=torch.float64), None, row_key
    keys = reference.row_keys_for(x, ids)
    assert bool(reference.dropout_keep_mask(seed, config.depth, keys, 6, p)[row, feature]), \
        "reference: a draw equal to the threshold must be kept (keep when draw >= threshold)"
    dtype = torch.float64 if backend in ("torch", "cpu_cpp") else torch.float32
    usable_backend(backend, backends.OpInputs(x.to(dtype), ids, [], config, 1.0, seed))
    seed_tensor = torch.tensor(seed)
    y = functional.hgt(x.to(dtype), [q.to(dtype) for q in params], config, ids=ids, seed=seed_tensor, backend=backend)
    y_ref = functional.hgt(x, params, config, ids=ids, seed=seed_tensor, backend="torch")
    assert y_ref[row, feature] != 0
    assert y[row, feature] != 0, f"{backend} drops the feature whose draw equals the threshold"
    assert_close(y.double(), y_ref, dtype, name="y at the dropout boundary")
