"""HGTConfig: the one place where the layer table of docs/math.md §2 is computed.

Every backend, module and benchmark reads `(in_features, out_features, groups, input_kind)`
from `HGTConfig.layers`; nothing else recomputes widths or group counts.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from fractions import Fraction
from typing import NamedTuple, Optional

from . import contract
from .checks import check_positive_int
from .codes import Activation, InputKind

TRANSFORMS = ("define", "define_nomix", "hgt", "glt", "linear")
GROUP_RULES = ("halve", "cycle")
WIDTH_ROUNDINGS = ("exact", "truncate")
NORMS = ("layernorm", None)
ACTS = tuple(act.label for act in Activation if act) + (None,)

# How a layer sees the stack input x and the previous output h: the labels of codes.InputKind.
INPUT_X, INPUT_MIX, INPUT_CONCAT, INPUT_PREV, INPUT_PROJ = (kind.label for kind in InputKind)

LN_EPS = 1e-5


class LayerSpec(NamedTuple):
    in_features: int
    out_features: int
    groups: int
    input_kind: str


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class HGTConfig:
    """Shape and options of one HGT stack (docs/math.md §2).

    Args:
        in_dim: p, width of the stack input x (the map dim n, or the in-proj dim).
        expand_dim: k, target width of the last expand layer.
        out_dim: m, width of the reduce layer (the embedding dim).
        depth: N, number of expand layers; the stack has N + 1 layers.
        max_groups: g_max, a power of two dividing in_dim.
        group_rule: "halve" (paper) or "cycle" (authors' reference code: 1, 2, .., g_max, 1, ..
            over N + 1 entries, reversed; the last entry is the reduce layer's g = 1).
        align: expand widths are rounded up to a multiple of lcm(g_l, g_{l+1}, align).
        width_rounding: "exact" rounds up the exact target p + (k - p) l / N; "truncate" (the
            authors' code) first truncates its float64 value to an integer (docs/math.md).
        output_layer: one more layer after reduce (the authors' layout): g = 1, in_features p + m,
            out_features m, over concat(x, y_reduce), with the norm, activation and dropout of
            the expand layers.
        transform: "define" (default), "define_nomix", "hgt", "glt" or "linear" (paper Table 4).
        shuffle: feature shuffle after each grouped transform.
        norm: "layernorm" (per-group LayerNorm, affine shared by a layer's groups) or None.
        act: "gelu" (erf form), "relu", "silu" or None.
        dropout: probability, applied after the activation of every layer in training.
        reduce_norm / reduce_act: whether the reduce layer also gets the norm / activation.
        in_proj_from: n, width of the op's input, when the stack starts with the in-proj
            x = dropout(act(LN(Linear_{n->in_dim}(e)))) (layer 0 of `layers`, one group, with
            the norm and activation of the expand layers); its output is the x every later
            layer reads. None (default): no in-proj, the op's input is x itself.
        in_proj_dropout: dropout probability of the in-proj layer (needs in_proj_from).
    """

    in_dim: int
    expand_dim: int
    out_dim: int
    depth: int
    max_groups: int
    group_rule: str = "halve"
    align: int = 8
    transform: str = "define"
    shuffle: bool = False
    norm: Optional[str] = "layernorm"
    act: Optional[str] = "gelu"
    dropout: float = 0.0
    reduce_norm: bool = True
    reduce_act: bool = True
    width_rounding: str = "exact"
    output_layer: bool = False
    in_proj_from: Optional[int] = None
    in_proj_dropout: float = 0.0

    def __post_init__(self):
        for name in ("in_dim", "expand_dim", "out_dim", "depth", "max_groups", "align"):
            check_positive_int(name, getattr(self, name))
        if not _is_power_of_two(self.max_groups):
            raise ValueError(f"max_groups must be a power of two, got {self.max_groups}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.group_rule not in GROUP_RULES:
            raise ValueError(f"group_rule must be one of {GROUP_RULES}, got {self.group_rule!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {self.act!r}")
        if self.width_rounding not in WIDTH_ROUNDINGS:
            raise ValueError(f"width_rounding must be one of {WIDTH_ROUNDINGS}, "
                             f"got {self.width_rounding!r}")
        for name in ("shuffle", "reduce_norm", "reduce_act", "output_layer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("dropout", "in_proj_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
        if self.in_proj_from is not None:
            check_positive_int("in_proj_from", self.in_proj_from)
        elif self.in_proj_dropout:
            raise ValueError(f"in_proj_dropout ({self.in_proj_dropout!r}) needs an in-proj "
                             f"(in_proj_from=n)")
        widest_group = max(self.expand_groups)
        if self.in_dim % widest_group:
            raise ValueError(
                f"in_dim ({self.in_dim}) must be divisible by max_groups ({widest_group}) "
                f"for transform {self.transform!r}")
        # Derived values cached on the frozen instance: computed once, here only. The key is a
        # plain attribute so torch.compile never traces json.
        object.__setattr__(self, "_layers", self._compute_layers())
        object.__setattr__(self, "_key", json.dumps(dataclasses.asdict(self), sort_keys=True,
                                                    separators=(",", ":")))

    # ----------------------------------------------------------------------------- groups
    @property
    def expand_groups(self) -> tuple:
        """g_l of the N expand layers (the reduce layer always has g = 1)."""
        n, g_max = self.depth, self.max_groups
        if self.transform == "linear":
            return (1,) * n
        if self.transform == "glt":
            return (g_max,) * n
        if self.group_rule == "halve":
            return tuple(max(g_max >> layer, 1) for layer in range(n))
        # cycle: 1, 2, 4, .., g_max, 1, 2, .. over the N + 1 layers, reversed; the last entry
        # (always 1) is the reduce layer's, so the expand layers get the first N.
        sequence, g = [], 1
        for _ in range(n + 1):
            sequence.append(g)
            g = g * 2 if g * 2 <= g_max else 1
        return tuple(reversed(sequence))[:n]

    # ----------------------------------------------------------------------------- layers
    def _input_kind(self) -> str:
        return {"define": INPUT_MIX, "define_nomix": INPUT_CONCAT}.get(self.transform, INPUT_PREV)

    def _compute_layers(self) -> tuple:
        p, k, n = self.in_dim, self.expand_dim, self.depth
        groups = self.expand_groups + (1,)
        kind = self._input_kind()
        layers, prev_width = [], None
        if self.in_proj_from is not None:
            layers.append(LayerSpec(self.in_proj_from, p, 1, INPUT_PROJ))
        for index in range(n):
            multiple = math.lcm(groups[index], groups[index + 1], self.align)
            width = -(-self._target_width(index + 1) // multiple) * multiple
            if index == 0:
                layers.append(LayerSpec(p, width, groups[0], INPUT_X))
            else:
                in_features = prev_width if kind == INPUT_PREV else p + prev_width
                layers.append(LayerSpec(in_features, width, groups[index], kind))
            prev_width = width
        reduce_in = prev_width if kind == INPUT_PREV else p + prev_width
        layers.append(LayerSpec(reduce_in, self.out_dim, 1, kind))
        if self.output_layer:
            layers.append(LayerSpec(p + self.out_dim, self.out_dim, 1, INPUT_CONCAT))
        return tuple(layers)

    def _target_width(self, layer: int):
        """Width target of expand layer `layer` (1-based) before rounding up: an exact Fraction,
        or, with width_rounding="truncate", the integer part of the authors' float64 value
        (numpy.linspace(p, k, N + 1)[layer]: start + layer * step, the endpoint exactly k)."""
        p, k, n = self.in_dim, self.expand_dim, self.depth
        if self.width_rounding == "exact":
            return Fraction(p) + Fraction(k - p) * layer / n
        return k if layer == n else int(p + layer * ((k - p) / n))

    @property
    def layers(self) -> tuple:
        """Every layer's (in_features, out_features, groups, input_kind): the in-proj when
        in_proj_from is set (index 0), the N expand layers, the reduce layer (index
        `reduce_index`), then the output layer when output_layer is on."""
        return self._layers

    @property
    def has_in_proj(self) -> bool:
        return self.in_proj_from is not None

    @property
    def first_stack_layer(self) -> int:
        """Index in `layers` of the first expand layer: 1 after an in-proj, else 0. The HGT
        module's `layers[i]` holds the parameters of `config.layers[i + first_stack_layer]`."""
        return 1 if self.has_in_proj else 0

    @property
    def input_width(self) -> int:
        """Width of the op's input rows: n with an in-proj, else in_dim (= p)."""
        return self.in_proj_from if self.has_in_proj else self.in_dim

    @property
    def reduce_index(self) -> int:
        """Index of the reduce layer in `layers` (the output layer, if any, follows it)."""
        return self.depth + self.first_stack_layer

    def layer_name(self, index: int) -> str:
        index -= self.first_stack_layer
        if index < 0:
            return "in_proj"
        if index < self.depth:
            return f"expand{index + 1}"
        return "reduce" if index == self.depth else "output"

    def layer_has_norm(self, index: int) -> bool:
        return self.norm is not None and (index != self.reduce_index or self.reduce_norm)

    def layer_act(self, index: int) -> Optional[str]:
        return self.act if index != self.reduce_index or self.reduce_act else None

    def layer_dropout(self, index: int) -> float:
        """Dropout probability after layer `index`'s activation (training only)."""
        return self.in_proj_dropout if index < self.first_stack_layer else self.dropout

    @property
    def has_dropout(self) -> bool:
        """Whether any layer drops out in training."""
        return self.dropout > 0 or self.in_proj_dropout > 0

    def param_shapes(self) -> tuple:
        """Shapes of the flat parameter list every op takes, in order (contract.LayerPlan)."""
        return contract.plan(self).param_shapes

    def params_per_layer(self, index: int) -> int:
        return contract.plan(self).layers[index].num_params

    # ----------------------------------------------------------------------------- counts
    @property
    def macs_per_token(self) -> int:
        """Multiply-accumulates of the grouped matmuls for one token (docs/math.md §5 FLOP = 2 x this)."""
        return sum(layer.in_features * layer.out_features // layer.groups for layer in self.layers)

    @property
    def num_parameters(self) -> int:
        """Transform parameters: weights, biases and norm affines of every layer."""
        return sum(math.prod(shape) for shape in self.param_shapes())

    # ----------------------------------------------------------------------------- op key
    @property
    def key(self) -> str:
        """A canonical string passed to the custom ops (they take no Python objects)."""
        return self._key

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_key(key: str) -> "HGTConfig":
        return HGTConfig(**json.loads(key))

    def table(self) -> str:
        """The per-layer table shown by the modules' extra_repr."""
        rows = []
        for index, layer in enumerate(self.layers):
            name = self.layer_name(index)
            extras = [layer.input_kind]
            if self.layer_has_norm(index):
                extras.append(self.norm)
            if self.layer_act(index):
                extras.append(self.layer_act(index))
            rows.append(f"  ({index}) {name}: {layer.in_features} -> {layer.out_features}, "
                        f"groups={layer.groups}, " + ", ".join(extras))
        return "\n".join(rows)
