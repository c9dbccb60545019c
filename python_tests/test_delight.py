"""The authors' DeFINE layout (define_kernels/delight.py) against an independent formulation.

`their_embedding` below is written from the authors' layout as docs/math.md describes it (their
DExTraEmb + DExTraUnit, `--define-iclr`): plain torch over their state-dict keys, a Python loop
over groups, LayerNorm and GELU spelled out; nothing from define_kernels.reference is used. Their
depth D counts the expand layers and the reduce layer (our depth N = D - 1).
"""
import math

import pytest
import torch

from define_kernels import DeFINE, HGT, HGTConfig, backends
from define_kernels.delight import from_delight, to_delight

from conftest import usable_backend
from tolerances import assert_close

PREFIX = "decoder.embed_tokens."


# ----------------------------------------------------------------------------- their layout
def their_layer_table(p, k, m, depth, max_groups):
    """(in, out, groups) per dextra layer, as their define_config computes them."""
    groups, counter = [], 0
    for _ in range(depth):
        g = 2 ** counter
        if g <= max_groups:
            counter += 1
        else:
            g, counter = 1, 1
        groups.append(g)
    groups = groups[::-1]
    step = (k - p) / (depth - 1)  # numpy.linspace(p, k, depth): i * step + start, endpoint k
    sizes = [int(i * step + p) for i in range(depth - 1)] + [int(k)]
    ins, outs = [p], []
    for i in range(depth - 1):
        multiple = max(groups[i + 1], groups[i], 8)
        outs.append(int(math.ceil(sizes[i + 1] / multiple)) * multiple)
        ins.append(outs[-1] + p)
    return list(zip(ins, outs + [m], groups))


def random_their_state_dict(vocab, n, m, k, depth, max_groups, norm=True, prefix="",
                            dtype=torch.float64, padding_idx=None):
    """Random tensors in their keys and layouts (biases and LN affines non-trivial)."""
    p = m // 2

    def layer(base, g, a, w):
        sd = {}
        if g == 1:
            sd[base + "weights"] = torch.randn(w, a, dtype=dtype) / math.sqrt(a)
            sd[base + "bias"] = torch.randn(w, dtype=dtype) * 0.3
        else:
            sd[base + "weights"] = torch.randn(g, a // g, w // g, dtype=dtype) / math.sqrt(a / g)
            sd[base + "bias"] = torch.randn(g, 1, w // g, dtype=dtype) * 0.3
        if norm:
            sd[base + "normalization_fn.weight"] = 1 + 0.3 * torch.randn(w // g, dtype=dtype)
            sd[base + "normalization_fn.bias"] = 0.3 * torch.randn(w // g, dtype=dtype)
        return sd

    sd = {"map_layer.weight": torch.randn(vocab, n, dtype=dtype) * n ** -0.5}
    if padding_idx is not None:
        sd["map_layer.weight"][padding_idx] = 0
    sd.update(layer("dextra_layer.input_layer.", 1, n, p))
    for index, (a, w, g) in enumerate(their_layer_table(p, k, m, depth, max_groups)):
        sd.update(layer(f"dextra_layer.dextra_layers.{index}.", g, a, w))
    sd.update(layer("dextra_layer.output_layer.", 1, p + m, m))
    return {prefix + key: value for key, value in sd.items()}


def _layer_norm(z, weight, bias):
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-5) * weight + bias


def _act(z, act):
    if act == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0)))
    return torch.clamp_min(z, 0) if act == "relu" else z


def _their_layer(sd, base, u, act):
    weights, bias = sd[base + "weights"], sd[base + "bias"]
    if weights.dim() == 2:
        z = u @ weights.t() + bias
        shape = None
    else:
        g = weights.shape[0]
        chunks = u.reshape(*u.shape[:-1], g, -1)
        z = torch.stack([chunks[..., j, :] @ weights[j] + bias[j, 0] for j in range(g)], dim=-2)
        shape = z.shape[:-2] + (z.shape[-2] * z.shape[-1],)
    if base + "normalization_fn.weight" in sd:
        z = _layer_norm(z, sd[base + "normalization_fn.weight"], sd[base + "normalization_fn.bias"])
    z = _act(z, act)
    return z if shape is None else z.reshape(shape)


def their_embedding(sd, ids, act="gelu", scale_map=True, prefix=""):
    """Their DExTraEmb forward (eval mode) for ids of any shape."""
    sd = {key[len(prefix):]: value for key, value in sd.items() if key.startswith(prefix)}
    table = sd["map_layer.weight"]
    x = table[ids] * (math.sqrt(table.shape[1]) if scale_map else 1.0)
    x = _their_layer(sd, "dextra_layer.input_layer.", x, act)
    depth = sum(1 for key in sd if key.startswith("dextra_layer.dextra_layers.") and key.endswith(".weights"))
    out = x
    for i in range(depth):
        out = _their_layer(sd, f"dextra_layer.dextra_layers.{i}.", out, act)
        following = sd.get(f"dextra_layer.dextra_layers.{i + 1}.weights")
        g_next = following.shape[0] if following is not None and following.dim() == 3 else 1
        if g_next == 1:
            out = torch.cat([x, out], dim=-1)
        else:  # split and mix: per group j, chunk j of x then chunk j of out
            x_g = x.reshape(*x.shape[:-1], g_next, -1)
            out_g = out.reshape(*out.shape[:-1], g_next, -1)
            out = torch.cat([x_g, out_g], dim=-1).reshape(*out.shape[:-1], -1)
    return _their_layer(sd, "dextra_layer.output_layer.", out, act)


# (vocab, n, m, k, D, max_groups, norm, act): wrapping cycles (D > log2(g_max) + 1), widths not
# multiples of 8, D = 11 (N >= 9, where truncation changes widths), no norm, relu.
CONFIGS = {
    "wrap4": (37, 16, 24, 40, 4, 4, True, "gelu"),
    "odd10": (29, 10, 20, 26, 3, 2, True, "gelu"),
    "deep11": (31, 8, 16, 37, 11, 8, True, "gelu"),
    "wrap6-relu-nonorm": (23, 12, 16, 30, 6, 4, False, "relu"),
}


def _module(name, backend="torch", dtype=torch.float64, prefix="", padding_idx=0):
    vocab, n, m, k, depth, max_groups, norm, act = CONFIGS[name]
    sd = random_their_state_dict(vocab, n, m, k, depth, max_groups, norm, prefix, dtype, padding_idx)
    module = from_delight(sd, prefix, act=act, padding_idx=padding_idx, backend=backend)
    return sd, module, act


def _ids_with_padding(vocab, shape):
    ids = torch.randint(0, vocab, shape)
    ids.view(-1)[0] = 0            # padding_idx: theirs is the stack of a zero row, not zero
    ids.view(-1)[-1] = vocab - 1
    return ids


def test_layer_tables_follow_their_config_and_truncation_matters():
    for name, (vocab, n, m, k, depth, max_groups, norm, act) in CONFIGS.items():
        _, module, _ = _module(name)
        table = their_layer_table(m // 2, k, m, depth, max_groups) + [(m // 2 + m, m, 1)]
        assert [(l.in_features, l.out_features, l.groups) for l in module.config.layers] == table
    config = _module("deep11")[1].config
    exact = HGTConfig(config.in_dim, config.expand_dim, config.out_dim, config.depth,
                      config.max_groups, group_rule="cycle", output_layer=True)
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
    """The output layer through the GPU backends (skips, with the reason, without a device)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for name in ("wrap4", "deep11"):
        check_gradients(name, backend, torch.float32, "cuda")


def _skip_unusable(backend, module, dtype, device="cpu"):
    config = module.config
    x = torch.zeros(1, config.in_dim, dtype=dtype, device=device)
    usable_backend(backend, backends.OpInputs(x, None, [], config, 1.0, None))


def _their_weight(weight):
    """Our [g, a/g, w/g] weight (or its gradient) in their layout: [w, a] when g = 1."""
    return weight[0].t() if weight.shape[0] == 1 else weight


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("cpu_cpp", torch.float64),
                                            ("cpu_cpp", torch.float32), ("triton", torch.float32)])
def test_output_layer_gradients_match_their_formulation(backend, dtype):
    check_gradients("wrap4", backend, dtype, "cpu")


def check_gradients(name, backend, dtype, device):
    """Output y and the gradients of the output, reduce, expand, in-proj and map parameters
    against autograd through their formulation in float64."""
    sd, module, act = _module(name, backend, dtype=dtype)
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
    out = module.config.reduce_index + 1
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


# ----------------------------------------------------------------------------- bad state dicts
def _good():
    return random_their_state_dict(23, 12, 16, 30, 6, 4, True, PREFIX)


def test_missing_key_is_named():
    for key in ("dextra_layer.output_layer.bias", "map_layer.weight",
                "dextra_layer.dextra_layers.2.normalization_fn.weight",
                "dextra_layer.input_layer.weights"):
        sd = _good()
        del sd[PREFIX + key]
        with pytest.raises(KeyError, match=PREFIX + key):
            from_delight(sd, PREFIX)
    with pytest.raises(KeyError, match="map_layer.weight"):
        from_delight(_good(), prefix="encoder.embed_tokens.")


def test_inconsistent_shapes_are_named():
    cases = {
        "dextra_layer.input_layer.bias": torch.zeros(5),
        "dextra_layer.output_layer.weights": torch.zeros(16, 20),
        "dextra_layer.dextra_layers.1.bias": torch.zeros(3),
        "dextra_layer.dextra_layers.3.normalization_fn.bias": torch.zeros(7),
        "dextra_layer.input_layer.weights": torch.zeros(8, 11),
    }
    for key, bad in cases.items():
        sd = _good()
        sd[PREFIX + key] = bad.double()
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            from_delight(sd, PREFIX)


def test_groups_not_power_of_two_or_off_cycle_are_named():
    sd = _good()
    key = PREFIX + "dextra_layer.dextra_layers.0.weights"
    a, w = sd[key].shape[0] * sd[key].shape[1], sd[key].shape[0] * sd[key].shape[2]
    sd[key] = torch.zeros(3, a // 3 if a % 3 == 0 else 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dextra_layers\.0\.weights.*power of two"):
        from_delight(sd, PREFIX)
    sd = _good()
    g = sd[key].shape[0]
    sd[key] = sd[key].reshape(g // 2, sd[key].shape[1] * 2, -1)  # wrong group count for the cycle
    with pytest.raises(ValueError, match=r"dextra_layers\.0\.weights has 2 groups.*cycle"):
        from_delight(sd, PREFIX)


def test_widths_off_the_authors_rule_are_named():
    sd = _good()
    key = PREFIX + "dextra_layer.dextra_layers.0.weights"
    g, a_g, w_g = sd[key].shape
    sd[key] = torch.zeros(g, a_g, w_g + 2, dtype=torch.float64)  # 8 wider than their rule gives
    with pytest.raises(ValueError, match=r"dextra_layers\.0\.weights: out_features .* width rule"):
        from_delight(sd, PREFIX)


def test_unexpected_key_under_prefix_is_named():
    sd = _good()
    sd[PREFIX + "dextra_layer.input_layer.normalization_fn.running_mean"] = torch.zeros(8)
    with pytest.raises(ValueError, match="running_mean"):
        from_delight(sd, PREFIX)
    assert from_delight(sd, PREFIX, strict=False).embedding_dim == 16


# ----------------------------------------------------------------------------- cycle rule change
def test_old_cycle_checkpoint_raises_naming_parameter_and_rule_change():
    # N=4, g_max=8: the old cycle gave 8, 4, 2, 1 (what "halve" gives here), the corrected 1, 8, 4, 2.
    old = HGT(HGTConfig(16, 64, 24, 4, 8, group_rule="halve")).state_dict()
    with pytest.raises(ValueError, match=r"layers\.0\.weight.*group_rule='cycle' was corrected"):
        HGT(HGTConfig(16, 64, 24, 4, 8, group_rule="cycle")).load_state_dict(old)
    old_define = DeFINE(30, 24, map_dim=16, expand_dim=64, depth=4, max_groups=8).state_dict()
    with pytest.raises(ValueError, match=r"hgt\.layers\.0\.weight"):
        DeFINE(30, 24, map_dim=16, expand_dim=64, depth=4, max_groups=8,
               group_rule="cycle").load_state_dict(old_define)
    same = HGT(HGTConfig(16, 64, 24, 4, 8, group_rule="cycle"))
    HGT(HGTConfig(16, 64, 24, 4, 8, group_rule="cycle")).load_state_dict(same.state_dict())


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
        outputs.append((y.detach(), module.hgt.layers[-1].weight.grad))
    (y_ref, grad_ref), (y, grad) = outputs
    assert (y_ref == 0).any()  # dropout is on
    assert_close(y, y_ref, dtype, name="y")
    assert_close(grad / grad_ref.abs().max(), grad_ref / grad_ref.abs().max(), dtype,
                 name="output layer weight grad")
