"""Reuse of a table parameter's dense gradient buffer between backward passes (CPU).

A map table's dense gradient is mostly zeros: a batch touches a few thousand of its rows. A fresh
buffer costs a page fault for every page a row lands on (cpp_library.table_grad allocates with calloc,
so untouched pages are never written), and an optimizer that reads the whole gradient faults in
every remaining page: at wt103-base, thousands of faults per step, where clearing and refilling a
buffer that is already mapped touches only the batch's rows (README, CPU goals).

So the gradient returned for a table parameter is an alias of a buffer kept here, per parameter
(held weakly: it goes with the parameter). At the next backward that buffer is reused when
  - nothing else holds its storage any more (the user dropped the gradient, e.g.
    `zero_grad(set_to_none=True)`, or autograd added it into an existing `.grad` and let it go),
  - and its version counter has not moved since it was handed out: no in-place change by anyone
    (the alias shares the counter), so every row except the ones written last time is still 0.
It is then cleared at the rows written last time and the new rows are added. Otherwise a fresh
buffer is made, and at most `MAX_BUFFERS` are tracked per parameter (two cover `.grad` kept and
accumulated into across steps). `clear()` drops every kept buffer.
"""
from __future__ import annotations

import threading
from typing import List, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .backends import cpp_library

MAX_BUFFERS = 2

_lock = threading.Lock()
_buffers: "WeakIdKeyDictionary" = WeakIdKeyDictionary()  # table -> [_Buffer]


class _Buffer:
    def __init__(self, tensor: torch.Tensor, written: torch.Tensor):
        self.tensor = tensor
        self.written = written  # ids of the rows that may be non-zero
        self.version = tensor._version

    def reusable(self) -> bool:
        # 2 = this tensor and the temporary storage object the query itself creates
        uses = torch._C._storage_Use_Count(self.tensor.untyped_storage()._cdata)
        return uses == 2 and self.tensor._version == self.version


def _eligible(table: Optional[torch.Tensor], grad_rows: torch.Tensor) -> bool:
    return (table is not None and type(table) in (torch.Tensor, torch.nn.Parameter)
            and table.is_leaf and table.requires_grad and table.device.type == "cpu"
            and table.dtype == grad_rows.dtype and table.dim() == 2 and grad_rows.dim() == 2
            and grad_rows.shape[1] == table.shape[1]
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def dense_grad(table: Optional[torch.Tensor], ids: torch.Tensor,
               grad_rows: torch.Tensor) -> Optional[torch.Tensor]:
    """zeros_like(table) + grad_rows at ids (summed per id), in a reused buffer when `table` is a
    CPU leaf parameter and the C++ library is loaded; None when it does not apply."""
    if not _eligible(table, grad_rows):
        return None
    written = ids.detach().to(torch.int64, copy=True)
    with _lock:
        kept: List[_Buffer] = _buffers.setdefault(table, [])
        for buffer in kept:
            if buffer.tensor.shape == table.shape and buffer.reusable():
                buffer.tensor.index_fill_(0, buffer.written, 0)
                if not cpp_library.table_grad_into(buffer.tensor, ids, grad_rows):
                    return None
                buffer.written, buffer.version = written, buffer.tensor._version
                return buffer.tensor.detach()  # shares the version counter
        fresh = cpp_library.table_grad(table.shape[0], ids, grad_rows)
        if fresh is None:
            return None
        kept.append(_Buffer(fresh, written))
        del kept[:-MAX_BUFFERS]
        return fresh.detach()


def clear() -> None:
    """Drops every kept gradient buffer (gradients handed out stay valid)."""
    with _lock:
        _buffers.clear()
