"""The authors' DeFINE layout (their DeLighT fairseq fork, `--define-iclr`): preset, import, export.
The logic, free of define.py (which calls it with its class); delight.py is the public face.

Their `DExTraEmb` is: map table (times sqrt(n)), in-proj n -> p = m/2 with LN, activation and
dropout, an HGT stack with group_rule="cycle" and width_rounding="truncate", and an output layer
Linear(p + m -> m) over concat(x, y_reduce); docs/math.md lists their state-dict keys. Their
depth D counts the expand layers and the reduce layer: our depth N = D - 1.

    embed = DeFINE.from_delight(checkpoint["model"], prefix="decoder.embed_tokens.")
    theirs = to_delight(embed, prefix="decoder.embed_tokens.")
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional

import torch

from .config import HGTConfig, _is_power_of_two

if TYPE_CHECKING:  # define.py imports this module and passes its class in
    from .define import DeFINE

MAP = "map_layer.weight"
IN_PROJ = "dextra_layer.input_layer."
LAYER = "dextra_layer.dextra_layers.{}."
OUTPUT = "dextra_layer.output_layer."
NORM = "normalization_fn."

# What their layout fixes; DeFINE.delight() sets these, from_delight() checks nothing else.
DELIGHT_HGT_OPTIONS = dict(group_rule="cycle", width_rounding="truncate", output_layer=True,
                           transform="define", shuffle=False, align=8, reduce_norm=True,
                           reduce_act=True)


def delight_define(module_class, num_embeddings: int, embedding_dim: int, *, map_dim: int = 128,
                   expand_dim: Optional[int] = None, width_multiplier: float = 2.0,
                   depth: int = 3, max_groups: int = 8, dropout: float = 0.0,
                   padding_idx: Optional[int] = None, **options) -> DeFINE:
    """A DeFINE in the authors' layout: in-proj p = embedding_dim // 2 (always on, with dropout),
    cycle groups, truncated widths, the output layer, their init, padding output not zeroed.

    depth is N, the expand layers (their --delight-emb-depth is N + 1); expand_dim is k, by
    default map_dim * width_multiplier (which must then be an integer). dropout is their
    --delight-dropout (every layer, in-proj included); other DeFINE options pass through
    (map_dropout, act, norm, backend, ...).
    """
    if embedding_dim % 2:
        raise ValueError(f"embedding_dim must be even (in-proj p = embedding_dim / 2), got {embedding_dim}")
    if expand_dim is None:
        k = map_dim * width_multiplier
        if k != int(k):
            raise ValueError(f"map_dim * width_multiplier must be an integer, got {k} "
                             f"({map_dim} * {width_multiplier}); pass expand_dim instead")
        expand_dim = int(k)
    settings = dict(DELIGHT_HGT_OPTIONS, in_proj_dim=embedding_dim // 2, init="xavier_3d",
                    zero_padding_output=False, in_proj_dropout=dropout, dropout=dropout,
                    map_dropout_mode="sequence")
    settings.update(options)
    return module_class(num_embeddings, embedding_dim, map_dim=map_dim, expand_dim=expand_dim,
                  depth=depth, max_groups=max_groups, padding_idx=padding_idx, **settings)


# ----------------------------------------------------------------------------- import
def _get(state_dict: dict, prefix: str, key: str) -> torch.Tensor:
    full = prefix + key
    if full not in state_dict:
        raise KeyError(f"state_dict has no key {full!r} (the authors' DeFINE layout needs it)")
    return state_dict[full]


def _expect(state_dict: dict, prefix: str, key: str, shape: tuple) -> torch.Tensor:
    tensor = _get(state_dict, prefix, key)
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{prefix + key} has shape {list(tensor.shape)}, expected {list(shape)} "
                         f"from the other tensors")
    return tensor


def _layer_shape(state_dict: dict, prefix: str, index: int) -> tuple:
    """(groups, in_features, out_features) of their dextra layer `index`, from its weights."""
    key = LAYER.format(index) + "weights"
    weights = _get(state_dict, prefix, key)
    if weights.dim() == 2:  # g = 1: a Linear weight [w, a]
        return 1, weights.shape[1], weights.shape[0]
    if weights.dim() != 3:
        raise ValueError(f"{prefix + key} must be [w, a] (g = 1) or [g, a/g, w/g], "
                         f"got {list(weights.shape)}")
    groups = weights.shape[0]
    if not _is_power_of_two(groups) or groups == 1:
        raise ValueError(f"{prefix + key}: groups must be a power of two > 1 in the [g, a/g, w/g] "
                         f"layout, got {groups}")
    return groups, groups * weights.shape[1], groups * weights.shape[2]


def _infer_expand_dim(base: dict, widths: List[int], prefix: str) -> HGTConfig:
    """The HGTConfig whose layers have these widths. k is not stored: the last expand width is k
    rounded up to a multiple of max(g_N, 8), so try each k that rounds up to it (the first that
    reproduces every width gives the same layers as any other would)."""
    last = widths[-1]
    span = max(base["max_groups"], base["align"])
    for expand_dim in range(last, max(last - span, 0), -1):
        try:
            config = HGTConfig(expand_dim=expand_dim, **base)
        except ValueError:
            continue
        if [layer.out_features for layer in config.layers[:base["depth"]]] == widths:
            return config
    config = HGTConfig(expand_dim=last, **base)
    for index, (layer, width) in enumerate(zip(config.layers, widths)):
        if layer.out_features != width:
            raise ValueError(
                f"{prefix + LAYER.format(index)}weights: out_features {width} does not follow the "
                f"authors' width rule (truncated linspace from {base['in_dim']} to k, rounded up to "
                f"multiples of max(g_l, g_l+1, 8)) for any k; expected {layer.out_features} for "
                f"k = {last}")
    raise AssertionError("unreachable")  # pragma: no cover


def _norm_keys_present(state_dict: dict, prefix: str) -> bool:
    return prefix + IN_PROJ + NORM + "weight" in state_dict


def _check_unexpected(state_dict: dict, prefix: str, expected: set) -> None:
    for key in state_dict:
        if key.startswith(prefix) and key[len(prefix):].startswith(("map_layer.", "dextra_layer.")) \
                and key not in expected:
            raise ValueError(f"state_dict key {key!r} is not part of the authors' DeFINE layout "
                             f"(their norm layers other than LayerNorm are not supported)")


def from_delight(module_class, state_dict: Dict[str, torch.Tensor], prefix: str = "", *,
                 act: Optional[str] = "gelu", dropout: float = 0.0,
                 padding_idx: Optional[int] = None, strict: bool = True, **options) -> DeFINE:
    """A DeFINE holding one of the authors' DExTraEmb state dicts (keys under `prefix`).

    Shapes are read from the tensors (V, n, p, m, depth, groups, widths, k); the norm is
    LayerNorm when their normalization_fn keys are there, else none; act is not stored in
    their checkpoints (their default gelu). The module gets the tensors' dtype; other DeFINE
    options (backend, cache, map_dropout, ...) pass through. strict: keys under the prefix
    that are not part of their layout raise.
    """
    map_weight = _get(state_dict, prefix, MAP)
    if map_weight.dim() != 2:
        raise ValueError(f"{prefix + MAP} must be [V, n], got {list(map_weight.shape)}")
    num_embeddings, map_dim = map_weight.shape
    in_proj = _get(state_dict, prefix, IN_PROJ + "weights")
    if in_proj.dim() != 2 or in_proj.shape[1] != map_dim:
        raise ValueError(f"{prefix + IN_PROJ}weights must be [p, {map_dim}], got {list(in_proj.shape)}")
    p = in_proj.shape[0]
    has_norm = _norm_keys_present(state_dict, prefix)
    count = 0
    while prefix + LAYER.format(count) + "weights" in state_dict:
        count += 1
    if count < 2:
        raise KeyError(f"state_dict has no key {prefix + LAYER.format(count) + 'weights'!r} "
                       f"(their DeFINE has at least 2 dextra layers)")
    shapes = [_layer_shape(state_dict, prefix, index) for index in range(count)]
    depth, embedding_dim = count - 1, shapes[-1][2]
    if shapes[-1][0] != 1:
        raise ValueError(f"{prefix + LAYER.format(depth)}weights: the reduce layer must have g = 1, "
                         f"got {shapes[-1][0]}")
    max_groups = max(groups for groups, _, _ in shapes)
    base = dict(in_dim=p, out_dim=embedding_dim, depth=depth, max_groups=max_groups,
                norm="layernorm" if has_norm else None, act=act, dropout=dropout,
                **DELIGHT_HGT_OPTIONS)
    clashes = sorted(set(options) & set(base))
    if clashes:
        raise ValueError(f"{clashes} are read from the state dict or fixed by the authors' layout; "
                         f"do not pass them")
    if p % max_groups:
        raise ValueError(f"{prefix + IN_PROJ}weights: p = {p} is not divisible by the largest "
                         f"group count {max_groups}")
    # groups depend on depth and max_groups only: check them before searching k
    cycle = [spec.groups for spec in HGTConfig(expand_dim=shapes[-2][2], **base).layers[:count]]
    for index, ((groups, _, _), expected) in enumerate(zip(shapes, cycle)):
        if groups != expected:
            raise ValueError(f"{prefix + LAYER.format(index)}weights has {groups} groups; the "
                             f"authors' group cycle for depth {count} and max groups {max_groups} "
                             f"gives {cycle}")
    config = _infer_expand_dim(base, [w for _, _, w in shapes[:-1]], prefix)
    ours = _convert_to_ours(state_dict, prefix, config, map_dim, has_norm)
    if strict:
        _check_unexpected(state_dict, prefix, set(_their_keys(config, has_norm, prefix)))
    hgt_options = {name: value for name, value in base.items()
                   if name not in ("in_dim", "out_dim", "depth", "max_groups")}
    module_options = dict(init="xavier_3d", zero_padding_output=False, in_proj_dropout=dropout,
                          map_dropout_mode="sequence")
    module_options.update(options)
    module = module_class(num_embeddings, embedding_dim, map_dim=map_dim, expand_dim=config.expand_dim,
                    depth=depth, max_groups=max_groups, padding_idx=padding_idx, in_proj_dim=p,
                    **hgt_options, **module_options)
    module.to(map_weight.dtype)
    module.load_state_dict(ours)
    return module


def _convert_to_ours(state_dict: dict, prefix: str, config: HGTConfig, map_dim: int,
                     has_norm: bool) -> dict:
    """Their tensors, shape-checked, in our parameter names and layouts (copies)."""
    p = config.in_dim
    ours = {"map_weight": _get(state_dict, prefix, MAP),
            "in_proj.weight": _expect(state_dict, prefix, IN_PROJ + "weights", (p, map_dim)),
            "in_proj.bias": _expect(state_dict, prefix, IN_PROJ + "bias", (p,))}
    if has_norm:
        for name in ("weight", "bias"):
            ours[f"in_proj_norm.{name}"] = _expect(state_dict, prefix, IN_PROJ + NORM + name, (p,))
    for index, layer in enumerate(config.layers):
        g, a, w = layer.groups, layer.in_features, layer.out_features
        base = OUTPUT if index > config.reduce_index else LAYER.format(index)
        if g == 1:
            weight = _expect(state_dict, prefix, base + "weights", (w, a)).t().reshape(1, a, w)
            bias = _expect(state_dict, prefix, base + "bias", (w,)).reshape(1, w)
        else:
            weight = _expect(state_dict, prefix, base + "weights", (g, a // g, w // g))
            bias = _expect(state_dict, prefix, base + "bias", (g, 1, w // g)).reshape(g, w // g)
        ours[f"hgt.layers.{index}.weight"] = weight
        ours[f"hgt.layers.{index}.bias"] = bias
        if config.layer_has_norm(index):
            for name in ("weight", "bias"):
                ours[f"hgt.layers.{index}.norm_{name}"] = _expect(
                    state_dict, prefix, base + NORM + name, (w // g,))
    return {name: tensor.detach().clone().contiguous() for name, tensor in ours.items()}


def _their_keys(config: HGTConfig, has_norm: bool, prefix: str = "") -> List[str]:
    norm = [NORM + "weight", NORM + "bias"] if has_norm else []
    keys = [MAP] + [IN_PROJ + name for name in ["weights", "bias"] + norm]
    for index in range(len(config.layers)):
        base = OUTPUT if index > config.reduce_index else LAYER.format(index)
        keys += [base + name for name in ["weights", "bias"] + norm]
    return [prefix + key for key in keys]


# ----------------------------------------------------------------------------- export
def delight_layout_reasons(module: DeFINE) -> List[str]:
    """Why `module` cannot be written in the authors' layout (empty when it can)."""
    config, reasons = module.config, []
    for name, value in DELIGHT_HGT_OPTIONS.items():
        if getattr(config, name) != value:
            reasons.append(f"{name}={getattr(config, name)!r} (theirs: {value!r})")
    if module.in_proj is None:
        reasons.append("no in-proj (theirs always has one: in_proj_dim)")
    return reasons


def to_delight(module: DeFINE, prefix: str = "") -> Dict[str, torch.Tensor]:
    """`module`'s parameters as one of the authors' DExTraEmb state dicts (keys under prefix)."""
    reasons = delight_layout_reasons(module)
    if reasons:
        raise ValueError("module is not in the authors' DeFINE layout: " + "; ".join(reasons))
    config = module.config
    has_norm = config.norm is not None
    theirs = {MAP: module.map_weight,
              IN_PROJ + "weights": module.in_proj.weight, IN_PROJ + "bias": module.in_proj.bias}
    if has_norm:
        theirs[IN_PROJ + NORM + "weight"] = module.in_proj_norm.weight
        theirs[IN_PROJ + NORM + "bias"] = module.in_proj_norm.bias
    stack = config.layers[config.first_stack_layer:]  # the in-proj (layer 0) was written above
    for index, (layer, params) in enumerate(zip(stack, module.hgt.layers)):
        g, a, w = layer.groups, layer.in_features, layer.out_features
        base = OUTPUT if index > config.depth else LAYER.format(index)
        if g == 1:
            theirs[base + "weights"] = params.weight.reshape(a, w).t()
            theirs[base + "bias"] = params.bias.reshape(w)
        else:
            theirs[base + "weights"] = params.weight
            theirs[base + "bias"] = params.bias.reshape(g, 1, w // g)
        if has_norm:
            theirs[base + NORM + "weight"] = params.norm_weight
            theirs[base + NORM + "bias"] = params.norm_bias
    return {prefix + key: tensor.detach().clone().contiguous() for key, tensor in theirs.items()}
