"""The Triton path as `torch.library.triton_op`s, so torch.compile / Inductor see the kernels.

The public op (ops.py) is a custom op: opaque to the compiler, which then calls it as one
black box. Here the same launches (triton_hgt.run_forward / _run_backward) run inside
`triton_op`s with every kernel passed through `wrap_triton`, so a graph captured with
torch.compile(fullgraph=True) or torch.export contains the Triton kernels themselves
(`triton_kernel_wrapper_functional` nodes) next to the surrounding torch ops, which Inductor
can schedule, fuse around and launch without a Python round trip.

    define_kernels::triton_hgt_forward(x, ids, params, config, scale, seed) -> y
    define_kernels::triton_hgt_backward(grad_y, x, ids, params, config, scale, seed)
        -> (grad_rows, grad_params)

Arguments as in ops.py (config is HGTConfig.key, seed a 0-d int64 tensor or None); the dropout
per-layer bases are computed from the seed tensor in torch ops, so a new seed per step does not
recompile. `hgt_triton` is the functional entry with autograd (gradient per gathered row
scattered into the table, as the public op does). No backend selection and no first-use check
here: this is the triton backend asked for explicitly.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.library import triton_op, wrap_triton

from ..checks import check_op_inputs
from ..config import HGTConfig
from . import triton_hgt


@triton_op("define_kernels::triton_hgt_forward", mutates_args=())
def triton_hgt_forward(x: torch.Tensor, ids: Optional[torch.Tensor], params: List[torch.Tensor],
                       config: str, scale: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    cfg = HGTConfig.from_key(config)
    with triton_hgt._on_device(x.device):
        return triton_hgt.run_forward(x, ids, list(params), cfg, scale, seed, save=False,
                                      wrap=wrap_triton)[0]


@triton_op("define_kernels::triton_hgt_backward", mutates_args=())
def triton_hgt_backward(grad_y: torch.Tensor, x: torch.Tensor, ids: Optional[torch.Tensor],
                        params: List[torch.Tensor], config: str, scale: float,
                        seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, List[torch.Tensor]]:
    cfg = HGTConfig.from_key(config)
    with triton_hgt._on_device(x.device):
        grad_rows, grad_params = triton_hgt._run_backward(
            grad_y.contiguous(), x, ids, list(params), cfg, scale, seed, wrap=wrap_triton)
    return grad_rows, list(grad_params)


def _setup_context(ctx, inputs, output):
    x, ids, params, config, scale, seed = inputs
    ctx.save_for_backward(x, ids, seed, *params)
    ctx.config, ctx.scale = config, scale


def _backward(ctx, grad_y):
    x, ids, seed, *params = ctx.saved_tensors
    grad_rows, grad_params = triton_hgt_backward(grad_y, x, ids, params, ctx.config, ctx.scale, seed)
    if ids is None:
        grad_x = grad_rows
    else:  # rows -> table, summed per id (as ops.py)
        grad_x = torch.zeros_like(x).index_add_(0, ids, grad_rows.to(x.dtype))
    return grad_x, None, list(grad_params), None, None, None


triton_hgt_forward.register_autograd(_backward, setup_context=_setup_context)


def hgt_triton(x: torch.Tensor, params: List[torch.Tensor], config: HGTConfig, *,
               ids: Optional[torch.Tensor] = None, scale: float = 1.0,
               seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ops.hgt on the triton backend, traceable into the caller's graph (see the module docstring)."""
    check_op_inputs(x, ids, list(params), config)
    return triton_hgt_forward(x, ids, list(params), config.key, float(scale), seed)
