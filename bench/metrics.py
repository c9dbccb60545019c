"""FLOP and byte counts of one benchmark step, from the config alone (never from timings).

FLOP: the grouped matmuls, 2 x config.macs_per_token per row the stack runs on; backward
costs twice the forward (gradient of the input and of the weights), so forward+backward and the
training step are 3x. Norms, activations, the optimizer and backends that recompute the
forward in backward add work not counted here: TFLOP/s is useful work per second.

Bytes: the traffic a step cannot avoid, each tensor read or written once, intermediates between
layers kept on chip (what a fused kernel achieves), optimizer states in the parameter dtype.
With T ids, U distinct ids, a table [V, d] (d = n for DeFINE's map, m for nn.Embedding), P
transform parameters, output width m, element size e:
    forward     8T (int64 ids) + U d e (table rows) + P e + T m e (output)
    backward    + T m e (grad of output) + P e (weights again) + P e (their grads)
                + U d e (stack input again; DeFINE only) + table grad: V d e dense, U d e sparse
    train step  + 7 e per optimizer element (AdamW/SparseAdam read p, g, m, v; write p, m, v):
                P + V d (dense) or P + U d (sparse)
    inference   as forward; from the cached [V, m] table: 8T + U m e + T m e
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from define_kernels.config import HGTConfig

MODES = ("forward", "forward_backward", "train", "inference")
ID_BYTES = 8
ADAM_TOUCHES = 7  # read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq


class StepCost(NamedTuple):
    """What one provider computes for one batch."""
    tokens: int                    # T: ids in the batch
    unique: int                    # U: distinct ids in the batch
    stack_rows: int                # rows the HGT stack runs on: U with dedup, T without, 0 for lookups
    vocab_size: int                # V
    table_dim: int                 # d: map dim n (DeFINE) or embedding dim m (nn.Embedding)
    out_dim: int                   # m
    elem_bytes: int                # e
    config: Optional[HGTConfig]    # None for a plain lookup table
    sparse: bool = False           # table gradient and optimizer touch only the batch's rows
    cached: bool = False           # inference served from the materialized [V, m] table


def flop_count(cost: StepCost, mode: str) -> int:
    """Matmul FLOP of one step (see the module docstring)."""
    _check_mode(mode)
    if cost.config is None or (mode == "inference" and cost.cached):
        return 0
    forward = 2 * cost.config.macs_per_token * cost.stack_rows
    return forward if mode in ("forward", "inference") else 3 * forward


def byte_count(cost: StepCost, mode: str) -> int:
    """Compulsory memory traffic of one step in bytes (see the module docstring)."""
    _check_mode(mode)
    t, u, e, m = cost.tokens, cost.unique, cost.elem_bytes, cost.out_dim
    params = cost.config.num_parameters if cost.config is not None else 0
    if mode == "inference" and cost.cached:
        return ID_BYTES * t + u * m * e + t * m * e
    total = ID_BYTES * t + u * cost.table_dim * e + params * e + t * m * e
    if mode in ("forward", "inference"):
        return total
    table_rows = u if cost.sparse else cost.vocab_size
    total += t * m * e + 2 * params * e + table_rows * cost.table_dim * e
    if cost.config is not None:
        total += u * cost.table_dim * e
    if mode == "train":
        total += ADAM_TOUCHES * e * (params + table_rows * cost.table_dim)
    return total


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
