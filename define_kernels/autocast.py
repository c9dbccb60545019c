"""Autocast for the public forward ops (CPU and CUDA): under torch.autocast they compute in the
autocast dtype from the given (fp32) tensors and return that dtype; gradients reach the fp32
tensors in fp32 through the casts. With ids and no dropout only the gathered rows are cast,
not the table.

torch.library.register_autocast casts to one dtype fixed at registration; the region's dtype is
wanted, so the kernel is registered on the Autocast keys directly (private dispatcher API).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import hgt_forward, hgt_forward_saving
from .table_gradient import gather_rows


def _autocast_inputs(device_type, x, ids, params, seed, sparse_grad=False):
    """The op's inputs cast to the current autocast dtype (as torch.library.register_autocast
    casts, but following the autocast region's dtype instead of one fixed at registration)."""
    dtype = torch.get_autocast_dtype(device_type)

    def eligible(t):
        return t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64

    if not eligible(x):
        return x, ids, params
    if ids is not None and seed is None and x.dtype != dtype:
        # Gather first so only the batch's rows are cast; with dropout the row keys must stay
        # the token ids, so the table is cast whole instead.
        x, ids = (F.embedding(ids, x, sparse=True) if sparse_grad else gather_rows(x, ids)), None
    return x.to(dtype), ids, [p.to(dtype) if eligible(p) else p for p in params]


def _register_autocast(op, device_type):
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, x, ids, params, config, scale, seed, backend, sparse_grad=False):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            cast_x, cast_ids, params = _autocast_inputs(device_type, x, ids, params, seed, sparse_grad)
            # gathered before the op (cast_ids None): the sparse gradient comes from F.embedding
            return op._opoverload(cast_x, cast_ids, params, config, scale, seed, backend,
                                  sparse_grad and cast_ids is not None)

    op._lib.impl(op._name, kernel, key, with_keyset=True)


for _op in (hgt_forward, hgt_forward_saving):
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_op, _device_type)
