"""Argument checks shared by the op's contract (contract.py), the modules and the relatives.

Metadata checks run before any kernel and under FakeTensor tracing; value checks
(`check_ids_in_range`) read the ids and so run only on real tensors.
"""
from __future__ import annotations

import torch

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
