"""Argument checks shared by the relatives (ids like DeFINE's; sizes as positive ints)."""
from __future__ import annotations

import torch

from ..checks import check_ids_dtype, check_ids_in_range, check_same_device


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_ids(ids: torch.Tensor, num_embeddings: int, device: torch.device) -> None:
    """ValueError for a non-integer / misplaced ids tensor, IndexError naming a bad id."""
    check_ids_dtype(ids)
    check_same_device(ids, "ids", device)
    check_ids_in_range(ids.reshape(-1), num_embeddings)


def check_hidden(h, width: int, dtype: torch.dtype, argument: str = "h") -> None:
    if not isinstance(h, torch.Tensor) or h.dim() == 0 or h.shape[-1] != width:
        shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"{argument} must have shape [..., {width}], got {shape}")
    if h.dtype != dtype:
        raise ValueError(f"{argument} has dtype {h.dtype} but the parameters have {dtype}")
