"""Argument checks shared by the relatives (ids like DeFINE's; hidden states)."""
from __future__ import annotations

import torch

from ..checks import check_ids_dtype, check_ids_in_range, check_last_dim, check_same_device


def check_ids(ids: torch.Tensor, num_embeddings: int, device: torch.device) -> None:
    """ValueError for a non-integer / misplaced ids tensor, IndexError naming a bad id."""
    check_ids_dtype(ids)
    check_same_device(ids, "ids", device)
    check_ids_in_range(ids.reshape(-1), num_embeddings)


def check_hidden(h, width: int, dtype: torch.dtype, argument: str = "h") -> None:
    """h [..., width] in the parameters' dtype, or (as nn.Linear allows) in the autocast dtype
    of an autocast region on h's device."""
    check_last_dim(h, width, argument)
    device_type = h.device.type
    if h.dtype != dtype and not (torch.is_autocast_enabled(device_type)
                                 and h.dtype == torch.get_autocast_dtype(device_type)):
        raise ValueError(f"{argument} has dtype {h.dtype} but the parameters have {dtype}")
