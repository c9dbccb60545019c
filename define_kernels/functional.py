"""`hgt`, the functional entry point of the HGT op: picks the activation policy and the op.

"recompute" runs ops.hgt_forward, whose backward reruns the forward from the inputs; "save" runs
ops.hgt_forward_saving, which also returns the activations its backward needs; "auto" is the
device's default (backends.DEFAULT_POLICY). Without autograd both run hgt_forward. While
torch.compile traces, where the triton backend would run, the triton_ops are called instead, so
the graph holds the Triton kernels (backends/triton_library.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import autocast, autograd, backends  # noqa: F401  (autocast, autograd: the ops' rules)
from .config import HGTConfig
from .ops import hgt_forward, hgt_forward_saving


def hgt(x: torch.Tensor, params: List[torch.Tensor], config: HGTConfig, *,
        ids: Optional[torch.Tensor] = None, scale: float = 1.0,
        seed: Optional[torch.Tensor] = None, backend: str = "auto",
        activations: str = "auto", sparse_grad: bool = False) -> torch.Tensor:
    """The HGT stack on x (or on x[ids], x a table), as ops.hgt_forward documents; see above."""
    if sparse_grad and ids is None:
        raise ValueError("sparse_grad needs ids (a table gathered by the op)")
    policy = backends.resolve_activation_policy(backends.check_activation_policy(activations),
                                                x.device, x.dtype, backend)
    params = list(params)
    if policy == backends.RECOMPUTE and torch.compiler.is_compiling():
        # the triton backend as triton_ops, so Inductor sees its kernels (imported here: defining
        # triton_ops imports triton, which importing the package must not)
        from .backends import triton_library
        if triton_library.traced_route(x, ids, config, seed, backend):
            return triton_library.hgt_triton(x, params, config, ids=ids, scale=scale, seed=seed,
                                             sparse_grad=sparse_grad)
    if policy == backends.SAVE and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)):
        return hgt_forward_saving(x, ids, params, config.key, float(scale), seed, backend,
                                  bool(sparse_grad))[0]
    return hgt_forward(x, ids, params, config.key, float(scale), seed, backend, bool(sparse_grad))
