"""The backends `cpu_cpp` and `cuda`: the C++ ops of define_kernels_C (loaded by
cpp_library.py, built by cpp_build.py) behind the registry, with the HGTConfig encoded as the
ops take it (contract.Plan.encode).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import contract
from ..config import HGTConfig
from .cpp_build import EXT_NAME, cuda_build_reason
from .cpp_library import load_library, unavailable_reason  # noqa: F401  (lm_head/cpu_cpp.py reads load_library here)
from .registry import Backend, register_backend


# ----------------------------------------------------------------------------- layer encoding
def encode_layers(config: HGTConfig) -> List[int]:
    """The `layers` argument of the C++ ops: contract.Plan.encode (codes in codes.py)."""
    return contract.plan(config).encode()


def cpp_args(config: HGTConfig, scale: float, seed: Optional[int]) -> tuple:
    """(layers, shuffle, dropout, scale, seed) as the C++ ops take them; seed -1 = no dropout."""
    return (encode_layers(config), bool(config.shuffle), float(config.dropout), float(scale),
            -1 if seed is None else int(seed))



# ----------------------------------------------------------------------------- backends
def _ops():
    reason = load_library().reason
    if reason:
        raise RuntimeError(f"{EXT_NAME} is unavailable: {reason}")
    return torch.ops.define_kernels_C


def forward(x, ids, params: Sequence[torch.Tensor], config: HGTConfig, scale=1.0, seed=None):
    return _ops().hgt_forward(x, ids, list(params), *cpp_args(config, scale, seed))


def backward(grad_y, x, ids, params: Sequence[torch.Tensor], config: HGTConfig, scale=1.0, seed=None):
    grad_rows, grad_params = _ops().hgt_backward(
        grad_y, x, ids, list(params), *cpp_args(config, scale, seed))
    return grad_rows, list(grad_params)


def forward_saving(x, ids, params: Sequence[torch.Tensor], config: HGTConfig, scale=1.0, seed=None):
    y, saved = _ops().hgt_forward_saving(x, ids, list(params), *cpp_args(config, scale, seed))
    return y, list(saved)


def backward_saved(grad_y, x, ids, params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor],
                   config: HGTConfig, scale=1.0, seed=None):
    layers, shuffle, dropout, scale, seed = cpp_args(config, scale, seed)
    grad_rows, grad_params = _ops().hgt_backward_saved(
        grad_y, x, ids, list(params), list(saved), layers, shuffle, dropout, scale, seed)
    return grad_rows, list(grad_params)


def _cuda_unavailable_reason() -> Optional[str]:
    reason = unavailable_reason()
    if reason:
        return reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{EXT_NAME}::hgt_forward", "CUDA"):
        return f"{EXT_NAME} was built without its CUDA sources ({cuda_build_reason() or 'none found'})"
    return None


CUDA_MAX_LAYERS = 16  # dk_cuda::kMaxLayers in csrc/cuda/hgt_kernels.cuh (fixed-size pointer tables)


def _cuda_input_reasons(inputs) -> List[str]:
    reasons = []
    layers = len(inputs.config.layers)
    if layers > CUDA_MAX_LAYERS:
        reasons.append(f"{layers} layers, the CUDA kernels take at most {CUDA_MAX_LAYERS}")
    if inputs.config.has_in_proj:  # csrc/cuda reads one dropout p and x as every layer's skip
        reasons.append("in-proj layer (in_proj_from) not implemented in the CUDA kernels")
    return reasons


# `auto` order on CPU comes from the measured ranking (backends/measured_ranking.json); without
# one for a dtype, cpu_cpp follows the reference.
CPU_PRIORITY = 2000

register_backend(Backend(
    name="cpu_cpp",
    priority=CPU_PRIORITY,
    devices=("cpu",),
    dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
    forward=forward,
    backward=backward,
    unavailable_reason=unavailable_reason,
    activation_policies=("recompute", "save"),
    # fp16 computes in fp32 (csrc/cpu/hgt_cpu.cpp); its saved activations would be rounded to
    # fp16 and LayerNorm's backward amplifies that past the reference's error.
    save_dtypes=(torch.float32, torch.float64, torch.bfloat16),
    forward_saving=forward_saving,
    backward_saved=backward_saved,
    description="C++ CPU kernels (csrc/cpu): per layer whole-batch grouped GEMMs (ATen mm on "
                "strided views) and one fused row-block epilogue; fp32/fp64/bf16/fp16",
))

register_backend(Backend(
    name="cuda",
    priority=20,
    devices=("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    forward=forward,
    backward=backward,
    unavailable_reason=_cuda_unavailable_reason,
    input_reasons=_cuda_input_reasons,
    description="CUDA C++ kernels (csrc/cuda), compiled with the JIT/AOT/CMake build when "
                "torch has CUDA and nvcc exists",
))
