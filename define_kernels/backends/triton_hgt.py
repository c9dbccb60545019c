"""The `triton` backend's registry entry: availability, input reasons, and forward / backward
as the triton_ops of triton_library.py called eagerly (so the public op and a torch.compile'd
graph run the same launches; the launches and the design are in triton_launch.py).

Availability: CUDA tensors, priority 10 (ahead of C++ CUDA). With TRITON_INTERPRET=1 (tests,
debugging) also CPU tensors, with one pinned tile config, no autotune, no bf16, and priority
2000, behind the reference, so `auto` keeps running real work on compiled backends while
backend="triton" asks for the interpreter explicitly.
"""
from __future__ import annotations

import importlib
from typing import List, Optional

import torch

from . import triton_launch
from .registry import Backend, OpInputs, register_backend
from .triton_launch import interpreting
# The launch-level names bench/resource_report.py reads from this module.
from .triton_launch import (backward_tiles, deterministic_tiles, forward_configs,  # noqa: F401
                            stack_layout)

PRIORITY = 10               # ahead of the C++ CUDA backend
INTERPRETER_PRIORITY = 2000  # behind the reference: `auto` never routes real work to the interpreter


def _devices() -> tuple:
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def _priority() -> int:
    return INTERPRETER_PRIORITY if interpreting() else PRIORITY


def unavailable_reason() -> Optional[str]:
    return triton_launch.unavailable_reason(__package__ + ".triton_kernels.forward",
                                            __package__ + ".triton_kernels.backward")


def input_reasons(inputs: OpInputs) -> List[str]:
    reasons = []
    if interpreting() and inputs.x.device.type == "cpu" and inputs.x.dtype == torch.bfloat16:
        reasons.append("the Triton interpreter has no bfloat16")
    return reasons


def _triton_library():
    """backends/triton_library.py, loaded on first use: defining its triton_ops imports triton,
    which `import define_kernels` must not (the registry loads this module on every import)."""
    return importlib.import_module(f"{__package__}.triton_library")


def _seed_tensor(seed) -> Optional[torch.Tensor]:
    return None if seed is None else torch.tensor(seed, dtype=torch.int64)


def triton_forward(x, ids, params, config, scale=1.0, seed=None):
    """The registry's forward: the triton_op called eagerly."""
    with torch.no_grad():
        return _triton_library().triton_hgt_forward(x, ids, list(params), config.key, float(scale),
                                                 _seed_tensor(seed))


def triton_backward(grad_y, x, ids, params, config, scale=1.0, seed=None):
    """(grad_rows [T, p], grad_params): recompute (SAVE layout), then 3 kernels per layer; the
    triton_op's backward, called eagerly."""
    with torch.no_grad():
        grad_rows, grad_params = _triton_library().triton_hgt_backward(
            grad_y, x, ids, [p.detach() for p in params], config.key, float(scale), _seed_tensor(seed))
    return grad_rows, list(grad_params)



register_backend(Backend(
    name="triton",
    priority=_priority(),
    devices=_devices(),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    forward=triton_forward,
    backward=triton_backward,
    unavailable_reason=unavailable_reason,
    input_reasons=input_reasons,
    description="fused Triton kernels: one launch for the forward stack, recompute + grouped GEMMs backward",
))
