"""The table-gradient policy: how the gradient per gathered row becomes the table's gradient.

Every route (the public ops' autograd rule, the Triton triton_ops, the modules' dedup gather and
the autocast gather) hands back one gradient row per gathered id; `table_grad` turns them into
the table's gradient: a sparse COO tensor with `sparse_grad` (as nn.Embedding(sparse=True)),
else dense, summed per id, on CPU without a fill of the table's size (into the buffer of an
earlier backward, table_grad_cache.py, or C++ table_grad, whose pages stay untouched).
"""
from __future__ import annotations

import weakref

import torch

from . import table_grad_cache
from .backends import cpp_library


def table_grad(x, ids, grad_rows, sparse_grad=False):
    """The gradient of a table (ids given) or of dense rows x (ids None) from grad_rows."""
    if ids is None:
        return grad_rows
    if sparse_grad:  # one row per gathered id, uncoalesced, as nn.Embedding(sparse=True)
        return torch.sparse_coo_tensor(ids.unsqueeze(0).to(torch.int64), grad_rows.to(x.dtype),
                                       x.shape, check_invariants=False)
    # rows -> table: summed per id, dense like nn.Embedding's default gradient
    if x.is_contiguous():
        return rows_to_table(x.shape[0], ids, grad_rows.to(x.dtype), table=x)
    return torch.zeros_like(x).index_add_(0, ids, grad_rows.to(x.dtype))


def rows_to_table(num_rows, ids, grad_rows, table=None):
    """zeros [num_rows, width] + grad_rows at ids; on CPU without writing the whole table when
    the C++ library is loaded: into the buffer of an earlier backward when `table` is a leaf
    parameter (table_grad_cache), else into a fresh one (cpp_library.table_grad)."""
    grad = table_grad_cache.dense_grad(table, ids, grad_rows)
    if grad is None:
        grad = cpp_library.table_grad(num_rows, ids, grad_rows)
    if grad is not None:
        return grad
    return grad_rows.new_zeros(num_rows, grad_rows.shape[1]).index_add_(0, ids, grad_rows)


class _GatherRows(torch.autograd.Function):
    """x[ids] (x 2-D, ids 1-D) whose backward is rows_to_table: x's dense gradient without a
    fill of x's size, and several times faster on CPU than index_select's index_add."""

    @staticmethod
    def forward(x, ids):
        return x.index_select(0, ids)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ids = inputs
        ctx.save_for_backward(ids)
        ctx.num_rows, ctx.dtype = x.shape[0], x.dtype
        ctx.table = weakref.ref(x)  # the key of its reused gradient buffer, not kept alive

    @staticmethod
    def backward(ctx, grad_rows):
        (ids,) = ctx.saved_tensors
        return rows_to_table(ctx.num_rows, ids, grad_rows.to(ctx.dtype), table=ctx.table()), None


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[ids] for a 2-D x and 1-D ids, differentiable in x (see _GatherRows)."""
    return _GatherRows.apply(x, ids)
