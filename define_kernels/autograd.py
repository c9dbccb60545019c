"""The autograd rule of the HGT forward ops, one for every route.

The public ops (ops.py) and the Triton triton_op (backends/triton_library.py, the route
torch.compile traces into) save their inputs, call the matching backward op, and turn its
gradient per gathered row into the table's gradient by the one policy of table_gradient.py
(a sparse gradient with sparse_grad; on CPU, no fill of the table's size).
"""
from __future__ import annotations

import torch

from .ops import hgt_backward, hgt_backward_saved, hgt_forward, hgt_forward_saving
from .table_gradient import table_grad

_TRITON_OP = None  # ctx.backend of the triton_op route (it has no backend argument)


def _keep(ctx, x, ids, params, config, scale, seed, backend, sparse_grad, saved=()):
    ctx.save_for_backward(x, ids, seed, *params, *saved)
    ctx.num_params = len(params)
    ctx.config, ctx.scale, ctx.backend = config, scale, backend
    # autograd leaves sparse_grad out of the inputs when it has its default value (False)
    ctx.sparse_grad = bool(sparse_grad and sparse_grad[0])


def _grads_per_input(ctx, grad_table, grad_params):
    # One entry per input as autograd recorded them (needs_input_grad has that structure).
    return (grad_table, None, list(grad_params)) + (None,) * (len(ctx.needs_input_grad) - 3)


def _setup_context(ctx, inputs, output):
    x, ids, params, config, scale, seed, backend, *sparse_grad = inputs
    _keep(ctx, x, ids, params, config, scale, seed, backend, sparse_grad)


def _setup_context_triton(ctx, inputs, output):
    x, ids, params, config, scale, seed, *sparse_grad = inputs
    _keep(ctx, x, ids, params, config, scale, seed, _TRITON_OP, sparse_grad)


def _backward(ctx, grad_y):
    x, ids, seed, *params = ctx.saved_tensors
    if ctx.backend is _TRITON_OP:
        # the triton_op's backward, registered by backends/triton_library.py (which imports
        # this module, so it is reached through torch.ops rather than imported here)
        grad_rows, grad_params = torch.ops.define_kernels.triton_hgt_backward(
            grad_y, x, ids, params, ctx.config, ctx.scale, seed)
    else:
        grad_rows, grad_params = hgt_backward(grad_y, x, ids, params, ctx.config, ctx.scale, seed,
                                              ctx.backend)
    return _grads_per_input(ctx, table_grad(x, ids, grad_rows, ctx.sparse_grad), grad_params)


def _setup_context_saving(ctx, inputs, output):
    x, ids, params, config, scale, seed, backend, *sparse_grad = inputs
    _, saved = output
    ctx.mark_non_differentiable(*saved)
    # The saved activations never get a gradient: without this autograd would fill a zero
    # tensor per saved activation on every backward (two [T, width] buffers per layer).
    ctx.set_materialize_grads(False)
    _keep(ctx, x, ids, params, config, scale, seed, backend, sparse_grad, saved)


def _backward_saving(ctx, grad_y, _grad_saved):
    x, ids, seed, *rest = ctx.saved_tensors
    if grad_y is None:  # y itself reached the loss through nothing differentiable
        return _grads_per_input(ctx, None, [None] * ctx.num_params)
    params, saved = rest[:ctx.num_params], rest[ctx.num_params:]
    grad_rows, grad_params = hgt_backward_saved(grad_y, x, ids, params, saved, ctx.config,
                                                ctx.scale, seed, ctx.backend)
    return _grads_per_input(ctx, table_grad(x, ids, grad_rows, ctx.sparse_grad), grad_params)


hgt_forward.register_autograd(_backward, setup_context=_setup_context)
hgt_forward_saving.register_autograd(_backward_saving, setup_context=_setup_context_saving)
