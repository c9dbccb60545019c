"""The public ops, defined once with torch.library; every backend runs behind them.

    define_kernels::hgt_forward(x, ids, params, config, scale, seed, backend) -> y
    define_kernels::hgt_backward(grad_y, x, ids, params, config, scale, seed, backend)
        -> (grad_rows, grad_params)

x is a dense input [T, p] (ids None) or a map table [V, p] gathered by 1-D ids [T]; the stack input
is those rows times `scale`. `config` is `HGTConfig.key`; `seed` is a 0-d int64 CPU tensor in
training with dropout, else None; `backend` is a registry name or 'auto'. Backward returns the
gradient per gathered row; the autograd rule scatters it into the table, so the op never
allocates a table-sized buffer itself.

The ops are opaque to torch.compile (fullgraph-safe); `register_fake` gives their shapes.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import backends
from .checks import check_ids_in_range, check_op_inputs
from .config import HGTConfig


def _seed_value(seed: Optional[torch.Tensor]) -> Optional[int]:
    return None if seed is None else int(seed)


def _prepare(x, ids, params, config, scale, seed, backend):
    cfg = HGTConfig.from_key(config)
    check_op_inputs(x, ids, params, cfg)
    if ids is not None:
        check_ids_in_range(ids, x.shape[0])
    inputs = backends.OpInputs(x, ids, params, cfg, scale, _seed_value(seed))
    return backends.select(backend, inputs), inputs


@torch.library.custom_op("define_kernels::hgt_forward", mutates_args=())
def hgt_forward(x: torch.Tensor, ids: Optional[torch.Tensor], params: List[torch.Tensor],
                config: str, scale: float, seed: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    chosen, inputs = _prepare(x, ids, params, config, scale, seed, backend)
    return chosen.forward(*inputs)


@torch.library.custom_op("define_kernels::hgt_backward", mutates_args=())
def hgt_backward(grad_y: torch.Tensor, x: torch.Tensor, ids: Optional[torch.Tensor],
                 params: List[torch.Tensor], config: str, scale: float,
                 seed: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, List[torch.Tensor]]:
    chosen, inputs = _prepare(x, ids, params, config, scale, seed, backend)
    grad_rows, grad_params = chosen.backward(grad_y.contiguous(), *inputs)
    # Autograd can hand back grad_y itself (a one-row bias gradient); a custom op must not alias.
    taken = [grad_y, x, *params]
    return _unaliased(grad_rows, taken), [_unaliased(g, taken) for g in grad_params]


def _unaliased(tensor: torch.Tensor, inputs: List[torch.Tensor]) -> torch.Tensor:
    storage = tensor.untyped_storage().data_ptr()
    return tensor.clone() if any(t.untyped_storage().data_ptr() == storage for t in inputs) else tensor


def _rows(x, ids):
    return x.shape[0] if ids is None else ids.shape[0]


@hgt_forward.register_fake
def _hgt_forward_fake(x, ids, params, config, scale, seed, backend):
    cfg = HGTConfig.from_key(config)
    check_op_inputs(x, ids, params, cfg)
    return x.new_empty(_rows(x, ids), cfg.out_dim)


@hgt_backward.register_fake
def _hgt_backward_fake(grad_y, x, ids, params, config, scale, seed, backend):
    check_op_inputs(x, ids, params, HGTConfig.from_key(config))
    return x.new_empty(_rows(x, ids), x.shape[1]), [torch.empty_like(p) for p in params]


def _setup_context(ctx, inputs, output):
    x, ids, params, config, scale, seed, backend = inputs
    ctx.save_for_backward(x, ids, seed, *params)
    ctx.config, ctx.scale, ctx.backend = config, scale, backend


def _backward(ctx, grad_y):
    x, ids, seed, *params = ctx.saved_tensors
    grad_rows, grad_params = hgt_backward(grad_y, x, ids, params, ctx.config, ctx.scale, seed,
                                          ctx.backend)
    if ids is None:
        grad_x = grad_rows
    else:  # rows -> table: summed per id, dense like nn.Embedding's default gradient
        grad_x = torch.zeros_like(x).index_add_(0, ids, grad_rows.to(x.dtype))
    return grad_x, None, list(grad_params), None, None, None, None


hgt_forward.register_autograd(_backward, setup_context=_setup_context)


def hgt(x: torch.Tensor, params: List[torch.Tensor], config: HGTConfig, *,
        ids: Optional[torch.Tensor] = None, scale: float = 1.0,
        seed: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Functional form of the op taking an HGTConfig; see the module docstring."""
    return hgt_forward(x, ids, list(params), config.key, float(scale), seed, backend)


from .seed import draw_seed  # noqa: E402,F401  (kept here for callers of ops.draw_seed)
