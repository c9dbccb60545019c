"""The HGT op's contract, computed once per HGTConfig: what every implementation takes and returns.

`plan(config)` is a frozen per-layer table (widths, groups, input kind, norm, activation, dropout,
parameter offsets) with the parameter and saved-activation shapes; the reference, the Triton
layout and the C++ encoding read it. `check_inputs` is the one validator of the op's arguments
(the public op, its fakes and the C++ ops' fakes), and the `*_outputs` functions are the shapes
every fake returns. The C++ ops take the plan as ints (`Plan.encode`, decoded back and checked
by `decode`); csrc/include/define_kernels/checks.h is the same contract on the C++ side.

Metadata only: nothing here reads tensor values, so every check runs under FakeTensor tracing.
"""
from __future__ import annotations

import dataclasses
import functools
import struct
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch

from .checks import FLOAT_DTYPES, check_ids_dtype, check_same_device
from .codes import INTS_PER_LAYER, Activation, InputKind

if TYPE_CHECKING:  # config.py imports this module
    from .config import HGTConfig


def dropout_bits(p: float) -> int:
    """A dropout probability as the int64 holding its float64 bits (the 7th int of a layer)."""
    return struct.unpack("<q", struct.pack("<d", float(p)))[0]


def dropout_from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer: weight [g, a/g, w/g], bias [g, w/g], then (has_norm) the norm affine [w/g] x 2,
    starting at params[param_offset]."""
    index: int
    in_features: int
    out_features: int
    groups: int
    kind: InputKind
    has_norm: bool
    act: Activation
    dropout: float
    param_offset: int

    @property
    def num_params(self) -> int:
        return 4 if self.has_norm else 2

    @property
    def param_shapes(self) -> tuple:
        g, a, w = self.groups, self.in_features, self.out_features
        return ((g, a // g, w // g), (g, w // g)) + ((w // g,),) * (2 if self.has_norm else 0)

    def encode(self) -> Tuple[int, ...]:
        return (self.in_features, self.out_features, self.groups, int(self.kind), int(self.has_norm),
                int(self.act), dropout_bits(self.dropout))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The whole stack. input_width: the op's input rows (n with an in-proj, else p);
    stack_width: p, the x every layer after an in-proj reads. param_shapes and encoded are
    derived from the layers when the plan is made (plain fields: torch.compile reads them)."""
    layers: Tuple[LayerPlan, ...]
    input_width: int
    stack_width: int
    param_shapes: tuple = dataclasses.field(init=False)
    encoded: tuple = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "param_shapes",
                           tuple(shape for layer in self.layers for shape in layer.param_shapes))
        object.__setattr__(self, "encoded",
                           tuple(value for layer in self.layers for value in layer.encode()))

    @property
    def out_dim(self) -> int:
        return self.layers[-1].out_features

    @property
    def has_in_proj(self) -> bool:
        return self.layers[0].kind == InputKind.PROJ

    def saved_shapes(self, rows: int) -> List[tuple]:
        """The save policy's activations [pre_0, u_1, pre_1, ..., u_{L-1}, pre_{L-1}]: pre_l
        [T, w_l] (layer l's grouped-linear output, after the shuffle, before the norm), u_l
        [T, a_l] (layer l's input, l >= 1). Every backend with "save" uses this layout."""
        shapes = []
        for layer in self.layers:
            if layer.index:
                shapes.append((rows, layer.in_features))
            shapes.append((rows, layer.out_features))
        return shapes

    def encode(self) -> List[int]:
        """The `layers` argument of the C++ ops: INTS_PER_LAYER ints per layer (codes.py)."""
        return list(self.encoded)


def plan(config: "HGTConfig") -> Plan:
    """The layer plan of `config`, cached per config. Under torch.compile the plan is built in
    the trace instead: Dynamo does not use a function's cache (it traces the function and warns
    that it ignores the cache), and the plan is constant for the graph either way."""
    if torch.compiler.is_compiling():
        return _build_plan(config)
    return _cached_plan(config)


def _build_plan(config: "HGTConfig") -> Plan:
    layers, offset = [], 0
    for index, spec in enumerate(config.layers):
        layer = LayerPlan(index, spec.in_features, spec.out_features, spec.groups,
                          InputKind.of(spec.input_kind), config.layer_has_norm(index),
                          Activation.of(config.layer_act(index)), float(config.layer_dropout(index)),
                          offset)
        layers.append(layer)
        offset += layer.num_params
    return Plan(tuple(layers), config.input_width, config.in_dim)


_cached_plan = functools.lru_cache(maxsize=256)(_build_plan)


def decode(layers: Sequence[int], input_width: int, allow_in_proj: bool = True) -> Plan:
    """The Plan the C++ ops read from `layers` for an input of `input_width` columns; ValueError
    naming `layers` for what checks.h refuses (allow_in_proj False: the CUDA ops' refusal)."""
    if not layers or len(layers) % INTS_PER_LAYER:
        raise ValueError(f"layers must hold {INTS_PER_LAYER} ints per layer, got {len(layers)}")
    p, prev, decoded, offset = input_width, 0, [], 0
    for index in range(len(layers) // INTS_PER_LAYER):
        a, w, g, kind, norm, act, bits = layers[index * INTS_PER_LAYER:(index + 1) * INTS_PER_LAYER]
        if min(a, w, g) <= 0 or a % g or w % g or norm not in (0, 1) \
                or act not in set(Activation) or kind not in set(InputKind) \
                or (index == 0 and kind not in (InputKind.X, InputKind.PROJ)) \
                or (index > 0 and kind == InputKind.PROJ) or (kind == InputKind.PROJ and g != 1) \
                or (index == 1 and decoded[0].kind == InputKind.PROJ and kind != InputKind.X) \
                or not 0.0 <= dropout_from_bits(bits) < 1.0:
            raise ValueError(f"layers: layer {index} is invalid: {(a, w, g, kind, norm, act)}")
        if kind == InputKind.PROJ and not allow_in_proj:
            raise ValueError("layers: layer 0 is an in-proj (input_kind 4), which this "
                             "implementation does not run")
        expected_in = prev if kind == InputKind.PREV else \
            p + prev if kind in (InputKind.MIX, InputKind.CONCAT) else p
        if a != expected_in or (kind == InputKind.MIX and (p % g or prev % g)):
            raise ValueError(f"layers: layer {index}: in_features {a} does not match its input "
                             f"({expected_in})")
        layer = LayerPlan(index, a, w, g, InputKind(kind), bool(norm), Activation(act),
                          dropout_from_bits(bits), offset)
        decoded.append(layer)
        offset += layer.num_params
        prev = w
        if kind == InputKind.PROJ:
            p = w  # later layers read the in-proj's output as x
    return Plan(tuple(decoded), input_width, p)


# ----------------------------------------------------------------------------- the validator
def check_x(x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a floating tensor ({FLOAT_DTYPES}), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, in_dim], got shape {tuple(x.shape)}")


def check_inputs(x: torch.Tensor, ids: Optional[torch.Tensor], params: Sequence[torch.Tensor],
                 plan: Plan) -> None:
    """ValueError naming the argument for anything the op cannot take."""
    check_x(x)
    if x.shape[1] != plan.input_width:
        width = "in_proj_from" if plan.has_in_proj else "in_dim"
        raise ValueError(f"x has last dim {x.shape[1]} but the config's {width} is {plan.input_width}")
    if ids is not None:
        check_ids_dtype(ids)
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D for the op, got shape {tuple(ids.shape)}")
        check_same_device(ids, "ids", x.device)
    expected = plan.param_shapes
    if len(params) != len(expected):
        raise ValueError(f"params must hold {len(expected)} tensors for this config, got {len(params)}")
    for index, (param, shape) in enumerate(zip(params, expected)):
        if tuple(param.shape) != shape:
            raise ValueError(f"params[{index}] must have shape {shape}, got {tuple(param.shape)}")
        if param.dtype != x.dtype:
            raise ValueError(f"params[{index}] has dtype {param.dtype} but x has {x.dtype}")
        check_same_device(param, f"params[{index}]", x.device)


def check_encoded_inputs(x, ids, params, layers: Sequence[int], dropout: float, seed: int,
                         allow_in_proj: bool = True) -> Plan:
    """check_inputs for the C++ ops' arguments (the plan as `layers` ints, and the ops' scalar
    dropout and seed), in checks.h's order; returns the decoded plan."""
    check_x(x)
    if ids is not None and ids.dim() != 1:
        raise ValueError(f"ids must be 1-D for the op, got shape {tuple(ids.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not -1 <= seed < 2**31:
        raise ValueError(f"seed must be -1 (no dropout) or in [0, 2^31), got {seed}")
    decoded = decode(layers, x.shape[1], allow_in_proj)
    check_inputs(x, ids, params, decoded)
    return decoded


def check_grad_y(grad_y: torch.Tensor, x: torch.Tensor, ids, plan: Plan) -> None:
    expected = (rows_of(x, ids), plan.out_dim)
    if tuple(grad_y.shape) != expected or grad_y.dtype != x.dtype:
        raise ValueError(f"grad_y must have shape {list(expected)} and dtype {x.dtype}, got "
                         f"{list(grad_y.shape)} {grad_y.dtype}")


def check_saved(saved: Sequence[torch.Tensor], x: torch.Tensor, ids, plan: Plan) -> None:
    expected = plan.saved_shapes(rows_of(x, ids))
    got = [tuple(t.shape) for t in saved]
    if got != expected:
        raise ValueError(f"saved must hold tensors of shapes {expected}, got {got}")


# ----------------------------------------------------------------------------- output shapes
def rows_of(x: torch.Tensor, ids: Optional[torch.Tensor]) -> int:
    """Rows the op computes: one per id when it gathers, else one per row of x."""
    return x.shape[0] if ids is None else ids.shape[0]


def forward_outputs(x: torch.Tensor, ids, plan: Plan, saving: bool = False):
    """Empty outputs of a forward: y [T, m], and with `saving` also the saved activations."""
    rows = rows_of(x, ids)
    y = x.new_empty(rows, plan.out_dim)
    if not saving:
        return y
    return y, [x.new_empty(shape) for shape in plan.saved_shapes(rows)]


def backward_outputs(x: torch.Tensor, ids, params: Sequence[torch.Tensor]):
    """Empty outputs of a backward: the gradient per row [T, width of x] and per parameter."""
    return x.new_empty(rows_of(x, ids), x.shape[1]), [p.new_empty(p.shape) for p in params]
