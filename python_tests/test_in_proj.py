"""The in-proj as layer 0 of the fused op (docs/math.md §1): every backend at the op level against
the float64 reference (dropout on, its own probability, both activation policies), the module's
state-dict keys and checkpoint description unchanged, the CUDA decline, and bad arguments.
The authors' layout against their independent formulation: test_delight.py.
"""
import pytest
import torch

from define_kernels import DeFINE, HGT, HGTConfig, backends, checkpoint, codes, contract, functional
from define_kernels.backends import cpp_ext

from conftest import usable_backend
from tolerances import assert_close, assert_close_scaled, assert_low_precision_close

# (name, HGTConfig options): mix skip, concat skip + output layer + shuffle, no norm, no skip.
CONFIGS = [
    ("mix", dict(in_dim=8, expand_dim=32, out_dim=12, depth=3, max_groups=4, in_proj_from=10)),
    ("concat_output_shuffle", dict(in_dim=8, expand_dim=20, out_dim=10, depth=2, max_groups=2,
                                   in_proj_from=6, transform="define_nomix", output_layer=True,
                                   shuffle=True, group_rule="cycle", width_rounding="truncate")),
    ("relu_no_norm", dict(in_dim=4, expand_dim=12, out_dim=6, depth=2, max_groups=2, in_proj_from=9,
                          norm=None, act="relu", align=2)),
    ("hgt_no_skip", dict(in_dim=8, expand_dim=16, out_dim=8, depth=2, max_groups=2, in_proj_from=5,
                         transform="hgt")),
]
DROPOUTS = {"off": dict(), "stack": dict(dropout=0.3), "in_proj": dict(in_proj_dropout=0.4),
            "both": dict(dropout=0.2, in_proj_dropout=0.35)}
SEED = 4321


def _dtype(backend):
    return torch.float64 if backend in ("torch", "cpu_cpp") else torch.float32


def _inputs(config, gather, rows=11, vocab=17):
    generator = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=generator, dtype=torch.float64) * 0.5 for s in config.param_shapes()]
    if gather:
        ids = torch.randint(0, vocab, (rows,), generator=generator)
        ids[-1] = ids[0]  # a repeated id
        return torch.randn(vocab, config.input_width, generator=generator, dtype=torch.float64), ids, params
    return torch.randn(rows, config.input_width, generator=generator, dtype=torch.float64), None, params


def _run(backend, config, x, ids, params, dtype, seed, activations="auto"):
    """y and the gradients of (x, params) through the public op."""
    x = x.to(dtype).requires_grad_(True)
    params = [p.to(dtype).requires_grad_(True) for p in params]
    seed_tensor = None if seed is None else torch.tensor(seed)
    y = functional.hgt(x, params, config, ids=ids, scale=1.3, seed=seed_tensor, backend=backend,
                activations=activations)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return y.detach(), torch.autograd.grad(y, [x] + params, grad_y.to(dtype))


@pytest.mark.parametrize("dropout", sorted(DROPOUTS))
@pytest.mark.parametrize("name,options", CONFIGS, ids=[name for name, _ in CONFIGS])
@pytest.mark.parametrize("gather", [True, False], ids=["ids", "dense"])
def test_every_backend_matches_the_float64_reference(backend, name, options, gather, dropout):
    """Forward and every gradient (in-proj weight, bias, LN affine, map rows) against the
    reference in float64; hashed masks equal across backends, in-proj p differing from the stack's."""
    config = HGTConfig(**options, **DROPOUTS[dropout])
    dtype = _dtype(backend)
    x, ids, params = _inputs(config, gather)
    seed = SEED if config.has_dropout else None
    usable_backend(backend, backends.OpInputs(x.to(dtype), ids, [], config, 1.3, seed))
    policies = [p for p in ("recompute", "save") if p in backends._REGISTRY[backend].activation_policies]
    expected_y, expected_grads = _run("torch", config, x, ids, params, torch.float64, seed, "recompute")
    if seed is not None:
        assert (expected_y == 0).any() or dropout == "in_proj"
    for policy in policies:
        y, grads = _run(backend, config, x, ids, params, dtype, seed, policy)
        assert_close(y.double(), expected_y, dtype, name=f"{backend} {policy} y")
        names = ["grad_x"] + [f"grad_params[{i}]" for i in range(len(params))]
        for grad_name, grad, expected in zip(names, grads, expected_grads):
            assert_close_scaled(grad.double(), expected, dtype, name=f"{backend} {policy} {grad_name}")


def test_in_proj_dropout_changes_only_what_it_should():
    """The in-proj's mask is its own (p, layer 0): with the stack's p at 0 the output still moves,
    and it is the reference's mask (not F.dropout): two runs with one seed are identical."""
    config = HGTConfig(**CONFIGS[0][1], in_proj_dropout=0.5)
    x, ids, params = _inputs(config, True)
    y0, _ = _run("torch", config, x, ids, params, torch.float64, None)
    y1, _ = _run("torch", config, x, ids, params, torch.float64, SEED)
    y2, _ = _run("torch", config, x, ids, params, torch.float64, SEED)
    assert not torch.allclose(y0, y1) and torch.equal(y1, y2)


# ----------------------------------------------------------------------------- module
def _define(backend="torch", **options):
    return DeFINE(40, 12, map_dim=10, expand_dim=24, depth=2, max_groups=2, in_proj_dim=8,
                  backend=backend, **options)


def test_state_dict_keys_and_checkpoint_description_are_unchanged():
    model = _define()
    keys = ["map_weight", "_extra_state", "in_proj.weight", "in_proj.bias", "in_proj_norm.weight",
            "in_proj_norm.bias"] + [f"hgt.layers.{l}.{name}" for l in range(3)
                                    for name in ("weight", "bias", "norm_weight", "norm_bias")]
    assert list(model.state_dict()) == keys
    assert tuple(model.in_proj.weight.shape) == (8, 10) and tuple(model.hgt.layers[0].weight.shape) == (2, 4, 8)
    description = checkpoint.describe(model)
    assert "in_proj_from" not in description and "in_proj_dropout" not in description
    fresh = _define(in_proj_dropout=0.3)  # a runtime option: loads
    fresh.load_state_dict(model.state_dict())
    ids = torch.tensor([[1, 5, 1], [39, 0, 7]])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), model.eval()(ids))


@pytest.mark.parametrize("backend", ["torch", "cpu_cpp"])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4)], ids=["2d", "3d"])
def test_module_gradients_reach_the_in_proj_with_dropout(backend, shape):
    """Training with in-proj and stack dropout: each backend's outputs and in-proj gradients equal
    the reference backend's (same hashed masks), for 2-D and 3-D ids."""
    usable_backend(backend, backends.OpInputs(torch.zeros(1, 10, dtype=torch.float64), None, [],
                                              _define().config, 1.0, None))
    ids = torch.randint(0, 40, shape)
    results = []
    for name in ("torch", backend):
        torch.manual_seed(11)
        model = _define(name, dropout=0.2, in_proj_dropout=0.3, dtype=torch.float64).train()
        y = model(ids)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        results.append([y.detach()] + [p.grad for p in (model.in_proj.weight, model.in_proj.bias,
                                                         model.in_proj_norm.weight, model.map_weight)])
    for index, (actual, expected) in enumerate(zip(*reversed(results))):
        assert_close_scaled(actual, expected, torch.float64, name=f"{backend} output {index}")
    assert results[0][1].abs().sum() > 0


def test_hgt_module_refuses_an_in_proj_config():
    config = HGTConfig(**CONFIGS[0][1])
    stack = HGT(config)
    assert len(stack.layers) == len(config.layers) - 1  # the in-proj's parameters live in the owner
    with pytest.raises(ValueError, match="in_proj_from"):
        stack(torch.randn(3, config.in_dim))


# ----------------------------------------------------------------------------- declines, errors
def test_cuda_declines_the_in_proj_with_a_reason():
    config = HGTConfig(**CONFIGS[0][1])
    inputs = backends.OpInputs(torch.zeros(1, 10), None, [], config, 1.0, None)
    assert any("in-proj" in reason for reason in cpp_ext._cuda_input_reasons(inputs))
    plain = HGTConfig(8, 32, 12, 3, 4)
    assert cpp_ext._cuda_input_reasons(backends.OpInputs(torch.zeros(1, 8), None, [], plain, 1.0, None)) == []


def test_cpp_ops_check_the_in_proj_encoding():
    """The C++ ops name `layers` for an in-proj that is not layer 0, has groups or is not
    followed by an x layer, and for a dropout outside [0, 1) (and the Python fakes agree)."""
    config = HGTConfig(**CONFIGS[0][1])
    x, ids, params = _inputs(config, True)
    layers, shuffle, dropout, scale, seed = cpp_ext.cpp_args(config, 1.0, None)
    per = codes.INTS_PER_LAYER
    bad_kind = list(layers)
    bad_kind[per + 3] = 4          # layer 1 claims to be an in-proj
    bad_follow = list(layers)
    bad_follow[per + 3] = 1        # layer 1 after an in-proj must read x
    bad_dropout = list(layers)
    bad_dropout[6] = contract.dropout_bits(1.5)
    for bad in (bad_kind, bad_follow, bad_dropout):
        with pytest.raises(ValueError, match="layers"):
            contract.check_encoded_inputs(x, ids, params, bad, dropout, seed)
    if cpp_ext.unavailable_reason():
        pytest.skip(f"C++ library: {cpp_ext.unavailable_reason()}")
    for bad in (bad_kind, bad_follow, bad_dropout):
        with pytest.raises(ValueError, match="layers"):
            torch.ops.define_kernels_C.hgt_forward(x, ids, params, bad, shuffle, dropout, scale, seed)
    assert contract.dropout_from_bits(contract.dropout_bits(0.1)) == 0.1


@pytest.mark.parametrize("options, argument", [
    (dict(in_proj_from=0), "in_proj_from"),
    (dict(in_proj_from=True), "in_proj_from"),
    (dict(in_proj_from=10, in_proj_dropout=1.0), "in_proj_dropout"),
    (dict(in_proj_from=10, in_proj_dropout="0.1"), "in_proj_dropout"),
    (dict(in_proj_dropout=0.1), "in_proj_dropout"),
])
def test_bad_config_names_the_argument(options, argument):
    with pytest.raises(ValueError, match=argument):
        HGTConfig(8, 32, 12, 3, 4, **options)


@pytest.mark.parametrize("options, argument", [
    (dict(in_proj_dim=0), "in_proj_dim"),
    (dict(in_proj_dim=None, in_proj_dropout=0.1), "in_proj_dropout"),
    (dict(map_dropout_mode="position"), "map_dropout_mode"),
])
def test_bad_module_options_name_the_argument(options, argument):
    with pytest.raises(ValueError, match=argument):
        DeFINE(40, 12, map_dim=10, expand_dim=24, depth=2, max_groups=2, **options)


def test_op_input_width_is_the_map_width():
    config = HGTConfig(**CONFIGS[0][1])
    _, _, params = _inputs(config, True)
    with pytest.raises(ValueError, match="in_proj_from"):
        functional.hgt(torch.randn(4, config.in_dim, dtype=torch.float64), params, config)


@pytest.mark.parametrize("backend", ["triton", "cpu_cpp"])
def test_fp16_in_proj_within_twice_the_reference_error(backend):
    """fp16 (Triton's interpreter, cpu_cpp in fp32): at most twice as far from float64 as the
    reference run in fp16, forward and gradients, dropout on."""
    config = HGTConfig(**CONFIGS[1][1], dropout=0.2, in_proj_dropout=0.3)
    x, ids, params = _inputs(config, True)
    usable_backend(backend, backends.OpInputs(x.half(), ids, [], config, 1.3, SEED))
    exact_y, exact_grads = _run("torch", config, x, ids, params, torch.float64, SEED, "recompute")
    low_y, low_grads = _run("torch", config, x, ids, params, torch.float16, SEED, "recompute")
    y, grads = _run(backend, config, x, ids, params, torch.float16, SEED, "recompute")
    for name, got, exact, low in zip(["y", "grad_x"] + [f"grad_params[{i}]" for i in range(len(params))],
                                     [y, *grads], [exact_y, *exact_grads], [low_y, *low_grads]):
        norm = exact.abs().max().clamp_min(1.0)
        assert_low_precision_close(got / norm, exact / norm, low / norm, name=f"{backend} {name}")
