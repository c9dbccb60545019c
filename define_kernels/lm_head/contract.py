"""The LM-head loss contract (SPEC §4b, docs/math.md "LM head"): options, checks and output
shapes, defined once and read by the op, its fakes, the reference and every backend.

A backend sees only the kept tokens (targets != ignore_index, already validated) and computes

    forward(x [N, n], table [V, n], bias [V] | None, targets [N] int64, spec)
        -> (loss [N], ce [N], kl [N], stats [N, STATS])          all float32 (float64 for float64)
    backward(grad_loss [N], x, table, bias, targets, stats, spec)
        -> (grad_x [N, n], grad_table [V, n], grad_bias [V] | empty)   in the inputs' dtypes

with stats = (lse of z, lse of z/tau, lse of s) per token (the last two 0 without the augmented
loss): everything the backward needs besides the inputs, so no [N, V] tensor is ever kept.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Optional

import torch

from ..checks import FLOAT_DTYPES, ID_DTYPES

REDUCTIONS = ("mean", "sum", "none")
KL_SCALES = {"tau": lambda tau: tau, "tau2": lambda tau: tau * tau, "none": lambda tau: 1.0}
STATS = 3  # columns of `stats`: lse(z), lse(z / tau), lse(s)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16, "float64": torch.float64}


def _number(name: str, value, low: float, *, strict: bool = False, high: Optional[float] = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{name} must be a number {bound}" + (f" and <= {high}" if high is not None else "")
                         + f", got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class LMHeadSpec:
    """The loss options, checked on construction. `alpha > 0` turns the augmented loss on.

    compute_dtype is the GEMMs' dtype (None: the inputs' own; autocast sets its dtype);
    sparse_grad asks for the table's gradient as a sparse COO tensor (torch.optim.SparseAdam)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    alpha: float = 0.0
    tau: float = 10.0
    kl_scale: str = "tau"
    detach_target: bool = True
    padding_idx: Optional[int] = None
    compute_dtype: Optional[str] = None
    sparse_grad: bool = False

    def __post_init__(self):
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        _number("label_smoothing", self.label_smoothing, 0.0, high=1.0)
        _number("z_loss", self.z_loss, 0.0)
        _number("alpha", self.alpha, 0.0)
        _number("tau", self.tau, 0.0, strict=True)
        if self.kl_scale not in KL_SCALES:
            raise ValueError(f"kl_scale must be one of {tuple(KL_SCALES)}, got {self.kl_scale!r}")
        if self.padding_idx is not None and (isinstance(self.padding_idx, bool)
                                             or not isinstance(self.padding_idx, int) or self.padding_idx < 0):
            raise ValueError(f"padding_idx must be None or an int >= 0, got {self.padding_idx!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {tuple(COMPUTE_DTYPES)}, "
                             f"got {self.compute_dtype!r}")

    @property
    def augmented(self) -> bool:
        return self.alpha > 0

    @property
    def kl_coef(self) -> float:
        """The KL term's weight in the loss: alpha * kappa(tau)."""
        return self.alpha * KL_SCALES[self.kl_scale](self.tau) if self.augmented else 0.0

    @property
    def key(self) -> str:
        """The spec as the string the custom ops take (a schema cannot carry a dataclass); plain
        reprs, so torch.compile traces it as a constant."""
        return ";".join(f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self))

    @classmethod
    def from_key(cls, key: str) -> "LMHeadSpec":
        return _from_key(key)

    def replace(self, **changes) -> "LMHeadSpec":
        return dataclasses.replace(self, **changes)

    def gemm_dtype(self, x: torch.Tensor, table: torch.Tensor) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype] if self.compute_dtype else x.dtype


_SPECS: dict = {}


def _from_key(key: str) -> LMHeadSpec:
    spec = _SPECS.get(key)
    if spec is None:
        pairs = (item.split("=", 1) for item in key.split(";"))
        spec = _SPECS[key] = LMHeadSpec(**{name: ast.literal_eval(value) for name, value in pairs})
    return spec


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_inputs(x, table, bias, targets, spec: LMHeadSpec) -> None:
    """Metadata checks (no tensor values: they run under FakeTensor tracing too)."""
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.dtype not in FLOAT_DTYPES:
        raise ValueError(f"table must be a 2-D floating tensor [V, n], got {_shape(table)}"
                         + (f" {table.dtype}" if isinstance(table, torch.Tensor) else ""))
    vocab, width = table.shape
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"x must have shape [tokens, {width}] (the table's width), got {_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    if spec.compute_dtype is None and x.dtype != table.dtype:
        raise ValueError(f"x has dtype {x.dtype} but table has {table.dtype} (outside autocast they must match)")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in ID_DTYPES:
        raise ValueError(f"targets must be an int32/int64 tensor, got "
                         f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.shape != x.shape[:1]:
        raise ValueError(f"targets must have shape [{x.shape[0]}] (one per token of h), got {_shape(targets)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (vocab,)):
        raise ValueError(f"bias must have shape [{vocab}] (the table's rows), got {_shape(bias)}")
    for name, tensor in (("x", x), ("targets", targets), ("bias", bias)):
        if tensor is not None and tensor.device != table.device:
            raise ValueError(f"{name} is on {tensor.device} but table is on {table.device}")
    if 0 <= spec.ignore_index < vocab:
        raise ValueError(f"ignore_index ({spec.ignore_index}) is a class of the vocabulary [0, {vocab}); "
                         f"choose a value outside it (e.g. -100)")
    if spec.padding_idx is not None and spec.padding_idx >= vocab:
        raise ValueError(f"padding_idx ({spec.padding_idx}) must be < the table's rows ({vocab})")


def check_targets(targets: torch.Tensor, vocab: int, spec: LMHeadSpec) -> None:
    """IndexError naming a target outside [0, V) that is not ignore_index (reads values)."""
    if targets.numel() == 0 or targets.device.type == "meta":
        return
    bad = (targets != spec.ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise IndexError(f"targets contains {value}, outside [0, {vocab}) and not ignore_index "
                         f"({spec.ignore_index})")


def output_shapes(tokens: int) -> tuple:
    """Shapes of the forward op's outputs (loss, ce, kl, stats)."""
    return (tokens,), (tokens,), (tokens,), (tokens, STATS)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32
