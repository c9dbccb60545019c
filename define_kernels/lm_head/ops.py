"""The LM-head loss as torch.library custom ops; every backend runs behind them.

    define_kernels::lm_head_loss(x [T, n], table [V, n], bias [V]?, targets [T], spec, backend)
        -> (loss [T], ce [T], kl [T], stats [T, 3])
    define_kernels::lm_head_loss_backward(grad_loss [T], x, table, bias?, targets, stats, spec, backend)
        -> (grad_x [T, n], grad_table [V, n], grad_bias [V] or [0])

`spec` is LMHeadSpec.key. Per-token outputs are 0 at ignored tokens; the ops hand backends only
the kept tokens (contract.py). Autograd: loss is differentiable in x, table and bias; ce, kl and
stats are for logging and the backward. Autocast is the spec's compute_dtype (functional.py sets
it from the autocast region): the ops take the tensors as given (the fp32 master table and bias
stay fp32, backends cast tiles as they go), so gradients come back in the inputs' dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import registry
from .contract import LMHeadSpec, check_inputs, check_targets, output_shapes, stats_dtype


def _prepare(x, table, bias, targets, spec_key, backend):
    spec = LMHeadSpec.from_key(spec_key)
    check_inputs(x, table, bias, targets, spec)
    check_targets(targets, table.shape[0], spec)
    keep = targets != spec.ignore_index
    kept = None if bool(keep.all()) else keep.nonzero().squeeze(1)
    return spec, kept


def _take(t: torch.Tensor, kept: Optional[torch.Tensor]) -> torch.Tensor:
    return t if kept is None else t.index_select(0, kept)


def _spread(values: torch.Tensor, kept: Optional[torch.Tensor], tokens: int) -> torch.Tensor:
    """Kept-token rows back at their places among `tokens`, zeros elsewhere."""
    if kept is None:
        return values
    return values.new_zeros((tokens,) + tuple(values.shape[1:])).index_copy_(0, kept, values)


@torch.library.custom_op("define_kernels::lm_head_loss", mutates_args=())
def lm_head_loss_op(x: torch.Tensor, table: torch.Tensor, bias: Optional[torch.Tensor],
                    targets: torch.Tensor, spec: str,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    spec_, kept = _prepare(x, table, bias, targets, spec, backend)
    tokens = x.shape[0]
    if tokens == 0 or (kept is not None and kept.numel() == 0):
        return tuple(x.new_zeros(shape, dtype=stats_dtype(x)) for shape in output_shapes(tokens))
    chosen = registry.select(backend, x, table, spec_)
    outputs = chosen.forward(_take(x, kept), table, bias, _take(targets, kept).long(), spec_)
    return tuple(_spread(t.contiguous(), kept, tokens) for t in outputs)


@lm_head_loss_op.register_fake
def _lm_head_loss_fake(x, table, bias, targets, spec, backend):
    check_inputs(x, table, bias, targets, LMHeadSpec.from_key(spec))
    return tuple(x.new_empty(shape, dtype=stats_dtype(x)) for shape in output_shapes(x.shape[0]))


@torch.library.custom_op("define_kernels::lm_head_loss_backward", mutates_args=())
def lm_head_loss_backward(grad_loss: torch.Tensor, x: torch.Tensor, table: torch.Tensor,
                          bias: Optional[torch.Tensor], targets: torch.Tensor, stats: torch.Tensor,
                          spec: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec_, kept = _prepare(x, table, bias, targets, spec, backend)
    tokens = x.shape[0]
    if tokens == 0 or (kept is not None and kept.numel() == 0):
        return torch.zeros_like(x), torch.zeros_like(table), _empty_bias_grad(table, bias)
    chosen = registry.select(backend, x, table, spec_)
    grad_x, grad_table, grad_bias = chosen.backward(
        _take(grad_loss, kept).to(stats.dtype).contiguous(), _take(x, kept), table, bias,
        _take(targets, kept).long(), _take(stats, kept).contiguous(), spec_)
    return _spread(grad_x, kept, tokens), grad_table, grad_bias


def _empty_bias_grad(table, bias):
    return torch.zeros_like(bias) if bias is not None else table.new_empty(0)


@lm_head_loss_backward.register_fake
def _lm_head_loss_backward_fake(grad_loss, x, table, bias, targets, stats, spec, backend):
    check_inputs(x, table, bias, targets, LMHeadSpec.from_key(spec))
    return x.new_empty(x.shape), table.new_empty(table.shape), _empty_bias_grad(table, bias)


def _setup_context(ctx, inputs, output):
    x, table, bias, targets, spec, backend = inputs
    _, ce, kl, stats = output
    ctx.mark_non_differentiable(ce, kl, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, table, bias, targets, stats)
    ctx.spec, ctx.backend = spec, backend


def _backward(ctx, grad_loss, _grad_ce, _grad_kl, _grad_stats):
    if grad_loss is None:
        return None, None, None, None, None, None
    x, table, bias, targets, stats = ctx.saved_tensors
    grad_x, grad_table, grad_bias = lm_head_loss_backward(grad_loss, x, table, bias, targets, stats,
                                                          ctx.spec, ctx.backend)
    if LMHeadSpec.from_key(ctx.spec).sparse_grad:
        grad_table = grad_table.to_sparse(sparse_dim=1)
    return grad_x, grad_table, (grad_bias if bias is not None else None), None, None, None


lm_head_loss_op.register_autograd(_backward, setup_context=_setup_context)
