"""The authors' DeFINE layout (define_kernels/delight.py) against `delight_reference.py`, an
independent formulation of their code over their state-dict keys (not our reference): float64 on
the CPU backends, fp32 under the Triton interpreter (and on GPU backends when a device exists);
the preset; the bit-exact round trip. Bad state dicts: test_delight_errors.py.
"""
import math

import pytest
import torch

from define_kernels import DeFINE, HGTConfig, backends
from define_kernels.delight import from_delight, to_delight

from conftest import usable_backend
from delight_reference import random_their_state_dict, their_embedding, their_layer_table
from tolerances import assert_close

PREFIX = "decoder.embed_tokens."


# multiples of 8, D = 11 (N >= 9, where truncation changes widths), no norm, relu.
CONFIGS = {
    "wrap4": (37, 16, 24, 40, 4, 4, True, "gelu"),
    "odd10": (29, 10, 20, 26, 3, 2, True, "gelu"),
    "deep11": (31, 8, 16, 37, 11, 8, True, "gelu"),
    "wrap6-relu-nonorm": (23, 12, 16, 30, 6, 4, False, "relu"),
}


def _module(name, backend="torch", dtype=torch.float64, prefix="", padding_idx=0, **options):
    vocab, n, m, k, depth, max_groups, norm, act = CONFIGS[name]
    sd = random_their_state_dict(vocab, n, m, k, depth, max_groups, norm, prefix, dtype, padding_idx)
    module = from_delight(sd, prefix, act=act, padding_idx=padding_idx, backend=backend, **options)
    return sd, module, act


def _ids_with_padding(vocab, shape):
    ids = torch.randint(0, vocab, shape)
    ids.view(-1)[0] = 0            # padding_idx: theirs is the stack of a zero row, not zero
    ids.view(-1)[-1] = vocab - 1
    return ids


def test_layer_tables_follow_their_config_and_truncation_matters():
    for name, (vocab, n, m, k, depth, max_groups, norm, act) in CONFIGS.items():
        _, module, _ = _module(name)
        table = [(n, m // 2, 1)] + their_layer_table(m // 2, k, m, depth, max_groups) \
            + [(m // 2 + m, m, 1)]  # the in-proj is layer 0 of the table
        assert [(l.in_features, l.out_features, l.groups) for l in module.config.layers] == table
    config = _module("deep11")[1].config
    exact = HGTConfig(config.in_dim, config.expand_dim, config.out_dim, config.depth,
                      config.max_groups, group_rule="cycle", output_layer=True,
                      in_proj_from=config.in_proj_from)
    assert exact.layers != config.layers  # the D = 11 case really exercises truncation


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("backend", ["torch", "cpu_cpp"])
def test_import_matches_their_formulation_float64(name, shape, backend):
    sd, module, act = _module(name, backend, prefix=PREFIX)
    ids = _ids_with_padding(CONFIGS[name][0], shape)
    _skip_unusable(backend, module, torch.float64)
    expected = their_embedding(sd, ids, act, prefix=PREFIX)
    for training in (True, False):  # dedup path (dropout 0) and the eval cache
        module.train(training)
        with torch.no_grad():
            assert_close(module(ids), expected, torch.float64, name=f"{name} training={training}")


@pytest.mark.parametrize("name", ["wrap4", "odd10"])
def test_import_matches_their_formulation_triton_fp32(name):
    sd, module, act = _module(name, "triton", dtype=torch.float32)
    _skip_unusable("triton", module, torch.float32)
    ids = _ids_with_padding(CONFIGS[name][0], (2, 5))
    expected = their_embedding({k: v.double() for k, v in sd.items()}, ids, act)
    with torch.no_grad():
        assert_close(module.train()(ids), expected.float(), torch.float32, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_import_matches_their_formulation_on_gpu_fp32(backend):
    """Their layout through the GPU backends (skips, with the reason, without a device). The
    CUDA kernels do not run the in-proj layer: that backend must decline it, naming it."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "cuda":
        module = _module("wrap4", backend, dtype=torch.float32)[1].cuda()
        x = torch.zeros(1, module.config.input_width, device="cuda")
        reasons = backends._REGISTRY["cuda"].not_supported_reasons(
            backends.OpInputs(x, None, [], module.config, 1.0, None))
        assert any("in-proj" in reason for reason in reasons), reasons
        return
    for name in ("wrap4", "deep11"):
        check_gradients(name, backend, torch.float32, "cuda")


def _skip_unusable(backend, module, dtype, device="cpu"):
    config = module.config
    x = torch.zeros(1, config.input_width, dtype=dtype, device=device)
    usable_backend(backend, backends.OpInputs(x, None, [], config, 1.0, None))


def _their_weight(weight):
    """Our [g, a/g, w/g] weight (or its gradient) in their layout: [w, a] when g = 1."""
    return weight[0].t() if weight.shape[0] == 1 else weight


@pytest.mark.parametrize("backend, dtype, activations", [
    ("torch", torch.float64, "save"), ("torch", torch.float64, "recompute"),
    ("cpu_cpp", torch.float64, "save"), ("cpu_cpp", torch.float64, "recompute"),
    ("cpu_cpp", torch.float32, "auto"), ("triton", torch.float32, "auto")])
def test_output_layer_gradients_match_their_formulation(backend, dtype, activations):
    check_gradients("wrap4", backend, dtype, "cpu", activations)


def check_gradients(name, backend, dtype, device, activations="auto"):
    """Output y and the gradients of the output, reduce, expand, in-proj and map parameters
    against autograd through their formulation in float64."""
    sd, module, act = _module(name, backend, dtype=dtype, activations=activations)
    module = module.to(device)
    _skip_unusable(backend, module, dtype, device)
    ids = _ids_with_padding(CONFIGS[name][0], (2, 5))
    theirs = {key: value.double().requires_grad_(True) for key, value in sd.items()}
    grad_y = torch.randn(2, 5, module.embedding_dim, dtype=torch.float64)
    expected_y = their_embedding(theirs, ids, act)
    (expected_y * grad_y).sum().backward()
    y = module.train()(ids.to(device))
    (y * grad_y.to(device, dtype)).sum().backward()
    assert_close(y.detach().cpu(), expected_y.detach().to(dtype), dtype, name="y")
    grads = {key: param.grad.cpu() for key, param in module.named_parameters()}
    out = module.config.reduce_index  # hgt.layers index of the output layer (in-proj: config layer 0)
    pairs = {
        "output_layer.weights": (_their_weight(grads[f"hgt.layers.{out}.weight"]),
                                 theirs["dextra_layer.output_layer.weights"].grad),
        "output_layer.bias": (grads[f"hgt.layers.{out}.bias"][0],
                              theirs["dextra_layer.output_layer.bias"].grad),
        "output_layer.norm.weight": (grads[f"hgt.layers.{out}.norm_weight"],
                                     theirs["dextra_layer.output_layer.normalization_fn.weight"].grad),
        "reduce.weights": (_their_weight(grads[f"hgt.layers.{out - 1}.weight"]),
                           theirs[f"dextra_layer.dextra_layers.{out - 1}.weights"].grad),
        "expand1.weights": (_their_weight(grads["hgt.layers.0.weight"]),
                            theirs["dextra_layer.dextra_layers.0.weights"].grad),
        "expand2.weights": (_their_weight(grads["hgt.layers.1.weight"]),
                            theirs["dextra_layer.dextra_layers.1.weights"].grad),
        "in_proj.weight": (grads["in_proj.weight"], theirs["dextra_layer.input_layer.weights"].grad),
        "in_proj.bias": (grads["in_proj.bias"], theirs["dextra_layer.input_layer.bias"].grad),
        "in_proj_norm.weight": (grads["in_proj_norm.weight"],
                                theirs["dextra_layer.input_layer.normalization_fn.weight"].grad),
        "in_proj_norm.bias": (grads["in_proj_norm.bias"],
                              theirs["dextra_layer.input_layer.normalization_fn.bias"].grad),
        "map_weight": (grads["map_weight"], theirs["map_layer.weight"].grad),
    }
    for name, (grad, expected) in pairs.items():
        norm = expected.abs().max().clamp_min(1.0)  # gradients sum over tokens: compare to scale
        assert_close(grad / norm.to(dtype), expected / norm, dtype, name=name)


# ----------------------------------------------------------------------------- preset, round trip
@pytest.mark.parametrize("backend", ["torch", "cpu_cpp"])
def test_preset_matches_their_formulation(backend):
    module = DeFINE.delight(41, 24, map_dim=12, width_multiplier=2.5, depth=4, max_groups=4,
                            padding_idx=3, backend=backend).double()
    _skip_unusable(backend, module, torch.float64)
    with torch.no_grad():  # non-trivial norm affines and biases
        for name, param in module.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(0.3 * torch.randn_like(param))
    theirs = to_delight(module)
    vocab, n, m, k = 41, 12, 24, 30
    table = their_layer_table(m // 2, k, m, 5, 4)
    for index, (a, w, g) in enumerate(table):
        shape = (w, a) if g == 1 else (g, a // g, w // g)
        assert tuple(theirs[f"dextra_layer.dextra_layers.{index}.weights"].shape) == shape
    assert tuple(theirs["dextra_layer.output_layer.weights"].shape) == (m, m // 2 + m)
    assert tuple(theirs["dextra_layer.input_layer.weights"].shape) == (m // 2, n)
    ids = torch.tensor([[3, 0, 40, 7], [3, 3, 11, 12]])
    expected = their_embedding(theirs, ids)
    assert expected[0, 0].abs().max() > 0  # padding output is not zeroed, as theirs
    with torch.no_grad():
        assert_close(module.eval()(ids), expected, torch.float64, name="preset")


def test_preset_options_and_init():
    module = DeFINE.delight(50, 32, map_dim=16, depth=3, max_groups=4, dropout=0.1)
    config = module.config
    assert (config.group_rule, config.width_rounding, config.output_layer) == ("cycle", "truncate", True)
    assert module.in_proj.out_features == 16 and module.in_proj_dropout == 0.1 and config.dropout == 0.1
    assert not module.zero_padding_output and module.init == "xavier_3d"
    assert torch.count_nonzero(module.in_proj.bias) == 0
    bound = math.sqrt(6.0 / (16 + 16))
    assert module.in_proj.weight.abs().max() <= bound
    for layer in module.hgt.layers:
        g, a_g, w_g = layer.weight.shape
        # theirs: xavier_uniform_ over [g, a/g, w/g]: fan_in (a/g)(w/g), fan_out g (w/g)
        bound = math.sqrt(6.0 / (a_g * w_g + g * w_g)) if g > 1 else math.sqrt(6.0 / (a_g + w_g))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.8 * bound
    with pytest.raises(ValueError, match="width_multiplier"):
        DeFINE.delight(50, 32, map_dim=16, width_multiplier=1.3)
    with pytest.raises(ValueError, match="embedding_dim"):
        DeFINE.delight(50, 33, map_dim=16)


def test_in_proj_dropout_is_applied_in_training_only():
    module = DeFINE.delight(20, 16, map_dim=8, depth=2, max_groups=2, dropout=0.0,
                            in_proj_dropout=0.5, backend="torch")
    ids = torch.arange(20)
    with torch.no_grad():
        eval_out = module.eval()(ids)
        assert torch.equal(eval_out, module(ids))
        assert not torch.allclose(module.train()(ids), eval_out)


def test_round_trip_theirs_ours_theirs_is_bit_exact():
    for name in CONFIGS:
        vocab, n, m, k, depth, max_groups, norm, act = CONFIGS[name]
        sd = random_their_state_dict(vocab, n, m, k, depth, max_groups, norm, PREFIX)
        sd["decoder.layers.0.fc1.weight"] = torch.randn(3, 3)  # other model keys are ignored
        module = DeFINE.from_delight(sd, prefix=PREFIX, act=act)
        back = to_delight(module, prefix=PREFIX)
        assert set(back) == set(sd) - {"decoder.layers.0.fc1.weight"}
        for key, value in back.items():
            assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key


def test_export_refuses_other_layouts():
    with pytest.raises(ValueError, match="output_layer"):
        to_delight(DeFINE(20, 16, map_dim=8, depth=2, max_groups=2, in_proj_dim=8,
                          group_rule="cycle", width_rounding="truncate"))
    with pytest.raises(ValueError, match="in-proj"):
        to_delight(DeFINE(20, 16, map_dim=8, depth=2, max_groups=2, group_rule="cycle",
                          width_rounding="truncate", output_layer=True))



@pytest.mark.parametrize("backend, dtype", [("cpu_cpp", torch.float64), ("triton", torch.float32)])
def test_dropout_on_every_layer_matches_the_reference_backend(backend, dtype):
    """Hashed masks on the expand, reduce and output layers, and the in-proj dropout, agree
    between backends for one seed (so the output layer's mask index is the same everywhere)."""
    vocab, n, m, k, depth, max_groups, norm, act = CONFIGS["wrap4"]
    sd = random_their_state_dict(vocab, n, m, k, depth, max_groups, norm, dtype=dtype)
    ids = _ids_with_padding(vocab, (3, 4))
    outputs = []
    for name in ("torch", backend):
        module = from_delight(sd, act=act, dropout=0.3, backend=name).train()
        _skip_unusable(name, module, dtype)
        torch.manual_seed(7)
        y = module(ids)
        y.sum().backward()
        outputs.append((y.detach(), module.hgt.layers[-1].weight.grad, module.in_proj.weight.grad,
                        module.map_weight.grad))
    (y_ref, *grads_ref), (y, *grads) = outputs
    assert (y_ref == 0).any()  # dropout is on
    assert_close(y, y_ref, dtype, name="y")
    for name, grad, grad_ref in zip(["output layer weight", "in_proj.weight", "map_weight"], grads, grads_ref):
        assert_close(grad / grad_ref.abs().max(), grad_ref / grad_ref.abs().max(), dtype,
                     name=f"{name} grad")
