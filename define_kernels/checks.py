"""Argument checks shared by the public op, its fake, and the modules.

Metadata checks (`check_op_inputs`) run before any kernel and under FakeTensor tracing; value
checks (`check_ids_in_range`) read the ids and so run only on real tensors.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

if TYPE_CHECKING:  # config.py imports this module
    from .config import HGTConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_known_options(owner: str, options: dict, known) -> None:
    """TypeError naming `owner` and the first keyword it does not take (as Python's own call)."""
    for name in options:
        if name not in known:
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {name!r} "
                            f"(its HGT options are {', '.join(known)})")


def check_last_dim(tensor, width: int, argument: str) -> None:
    """ValueError unless `tensor` is a tensor of shape [..., width]."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.shape[-1] != width:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{argument} must have shape [..., {width}], got {shape}")


def check_ids_dtype(ids: torch.Tensor, argument: str = "ids") -> None:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{argument} must be a tensor, got {type(ids).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise ValueError(f"{argument} must be int32 or int64, got {ids.dtype}")


def check_same_device(tensor: torch.Tensor, argument: str, expected: torch.device) -> None:
    if tensor.device != expected:
        raise ValueError(f"{argument} is on {tensor.device} but the parameters are on {expected}")


def check_ids_in_range(ids: torch.Tensor, num_embeddings: int, argument: str = "ids") -> None:
    """IndexError naming the first bad value; skipped for meta/fake tensors (no values)."""
    if ids.numel() == 0 or ids.device.type == "meta":
        return
    low, high = (int(value) for value in torch.aminmax(ids))
    if low < 0 or high >= num_embeddings:
        bad = low if low < 0 else high
        raise IndexError(f"{argument} contains {bad}, outside [0, {num_embeddings}) "
                         f"(num_embeddings={num_embeddings})")


def check_op_inputs(x: torch.Tensor, ids: Optional[torch.Tensor], params: Sequence[torch.Tensor],
                    config: HGTConfig) -> None:
    """ValueError naming the argument for anything the op cannot take."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a floating tensor ({FLOAT_DTYPES}), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, in_dim], got shape {tuple(x.shape)}")
    if x.shape[1] != config.input_width:
        width = "in_proj_from" if config.has_in_proj else "in_dim"
        raise ValueError(f"x has last dim {x.shape[1]} but the config's {width} is {config.input_width}")
    if ids is not None:
        check_ids_dtype(ids)
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D for the op, got shape {tuple(ids.shape)}")
        check_same_device(ids, "ids", x.device)
    expected = config.param_shapes()
    if len(params) != len(expected):
        raise ValueError(f"params must hold {len(expected)} tensors for this config, got {len(params)}")
    for index, (param, shape) in enumerate(zip(params, expected)):
        if tuple(param.shape) != shape:
            raise ValueError(f"params[{index}] must have shape {shape}, got {tuple(param.shape)}")
        if param.dtype != x.dtype:
            raise ValueError(f"params[{index}] has dtype {param.dtype} but x has {x.dtype}")
        check_same_device(param, f"params[{index}]", x.device)
