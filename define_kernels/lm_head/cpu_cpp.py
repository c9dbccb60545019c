"""The `cpu_cpp` LM-head backend: the fused C++ kernels of csrc/cpu/lm_head.cpp (define_kernels_C)."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..backends import cpp_ext
from .contract import LMHeadSpec
from .registry import HeadBackend, register


def _unavailable() -> Optional[str]:
    reason = cpp_ext.load_library().reason
    if reason:
        return reason
    if not hasattr(torch.ops.define_kernels_C, "lm_head_forward"):
        return "the loaded define_kernels_C library has no lm_head ops (an older build)"
    return None


def _input_reasons(x, table, spec: LMHeadSpec) -> List[str]:
    if spec.augmented and not spec.detach_target:
        return ["the augmented loss with detach_target=False runs on the reference backend only"]
    return []


def _scalars(spec: LMHeadSpec, x: torch.Tensor, table: torch.Tensor) -> tuple:
    padding = -1 if spec.padding_idx is None else spec.padding_idx
    return (padding, spec.label_smoothing, spec.z_loss, spec.augmented, spec.kl_coef, spec.tau,
            spec.gemm_dtype(x, table))


def forward(x, table, bias, targets, spec: LMHeadSpec):
    return tuple(torch.ops.define_kernels_C.lm_head_forward(x, table, bias, targets,
                                                            *_scalars(spec, x, table)))


def backward(grad_loss, x, table, bias, targets, stats, spec: LMHeadSpec):
    return tuple(torch.ops.define_kernels_C.lm_head_backward(grad_loss, x, table, bias, targets, stats,
                                                             *_scalars(spec, x, table)))


register(HeadBackend(name="cpu_cpp", priority=10, devices=("cpu",),
                     dtypes=(torch.float32, torch.bfloat16, torch.float16),
                     forward=forward, backward=backward, unavailable_reason=_unavailable,
                     input_reasons=_input_reasons))
