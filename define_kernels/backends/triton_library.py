"""The Triton path as `torch.library.triton_op`s, so torch.compile / Inductor see the kernels.

The public op (ops.py) is a custom op: opaque to the compiler, which then calls it as one
black box. Here the same launches (triton_launch.run_forward / run_backward) run inside
`triton_op`s with every kernel passed through `wrap_triton`, so a graph captured with
torch.compile(fullgraph=True) or torch.export contains the Triton kernels themselves
(`triton_kernel_wrapper_functional` nodes) next to the surrounding torch ops, which Inductor
can schedule, fuse around and launch without a Python round trip.

    define_kernels::triton_hgt_forward(x, ids, params, config, scale, seed, sparse_grad=False) -> y
    define_kernels::triton_hgt_backward(grad_y, x, ids, params, config, scale, seed)
        -> (grad_rows, grad_params)

Arguments as in ops.py (config is HGTConfig.key, seed a 0-d int64 tensor or None); the dropout
per-layer bases are computed from the seed tensor in torch ops, so a new seed per step does not
recompile. `hgt_triton` is the functional entry; its autograd rule is the public op's
(define_kernels/autograd.py: the same table-gradient policy, sparse_grad included).

These ops ARE the triton backend: the registry's forward / backward (triton_hgt.py) call them
eagerly behind the public op, and while torch.compile traces, `functional.hgt` calls `hgt_triton`
instead of the opaque public op whenever `traced_route` says the selection would pick triton.
That decision is made once per trace, eagerly (torch._dynamo.assume_constant_result), by the
registry's own `select` on a small random probe of the same config, dtype, device and dropout
setting, so the first-use check runs there (same key as eager calls) and a demoted or unusable
triton keeps the opaque op. A demotion after the graph was compiled does not retrace it.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.library import triton_op, wrap_triton

from .. import contract
from ..config import HGTConfig
from . import first_use_check, triton_launch
from .registry import BackendUnavailableError, OpInputs, select


class _InterpretedLaunch:
    """wrap_triton for TRITON_INTERPRET=1 kernels, which wrap_triton hands back unwrapped
    (torch/_library/triton.py), so no graph can hold them. Dynamo's fake-tensor pass over the
    triton_op only needs the outputs' shapes (allocated before the launches): there the launch is
    skipped, which lets a CPU test trace the routing with fullgraph=True (backend="eager").
    A graph trace (make_fx: aot_eager, Inductor, export) would lose the kernels: that raises."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake
            from torch.fx.experimental.proxy_tensor import get_proxy_mode
            if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                return self.kernel[grid](*args, **kwargs)
            if get_proxy_mode() is not None:
                raise RuntimeError("define_kernels: TRITON_INTERPRET=1 kernels cannot enter a traced "
                                   "graph (wrap_triton passes interpreted kernels through); compile "
                                   "with backend='eager' on CPU, or run on a GPU")
            return None
        return launch


def _wrap(kernel):
    return _InterpretedLaunch(kernel) if triton_launch.interpreting() else wrap_triton(kernel)


@triton_op("define_kernels::triton_hgt_forward", mutates_args=())
def triton_hgt_forward(x: torch.Tensor, ids: Optional[torch.Tensor], params: List[torch.Tensor],
                       config: str, scale: float, seed: Optional[torch.Tensor],
                       sparse_grad: bool = False) -> torch.Tensor:
    cfg = HGTConfig.from_key(config)
    with triton_launch.on_device(x.device):
        return triton_launch.run_forward(x, ids, list(params), cfg, scale, seed, save=False,
                                      wrap=_wrap)[0]


@triton_op("define_kernels::triton_hgt_backward", mutates_args=())
def triton_hgt_backward(grad_y: torch.Tensor, x: torch.Tensor, ids: Optional[torch.Tensor],
                        params: List[torch.Tensor], config: str, scale: float,
                        seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, List[torch.Tensor]]:
    cfg = HGTConfig.from_key(config)
    with triton_launch.on_device(x.device):
        grad_rows, grad_params = triton_launch.run_backward(
            grad_y.contiguous(), x, ids, list(params), cfg, scale, seed, wrap=_wrap)
    return grad_rows, list(grad_params)


def hgt_triton(x: torch.Tensor, params: List[torch.Tensor], config: HGTConfig, *,
               ids: Optional[torch.Tensor] = None, scale: float = 1.0,
               seed: Optional[torch.Tensor] = None, sparse_grad: bool = False) -> torch.Tensor:
    """functional.hgt on the triton backend, traceable into the caller's graph (see the module docstring)."""
    contract.check_inputs(x, ids, list(params), contract.plan(config))
    if ids is not None and ids.numel():
        # the public op's IndexError check needs a host sync; in a graph: an async device assert
        torch._assert_async(((ids >= 0) & (ids < x.shape[0])).all(),
                            "define_kernels: ids out of range [0, x.shape[0])")
    return triton_hgt_forward(x, ids, list(params), config.key, float(scale), seed, bool(sparse_grad))


def traced_route(x: torch.Tensor, ids: Optional[torch.Tensor], config: HGTConfig,
                 seed: Optional[torch.Tensor], backend: str) -> bool:
    """While torch.compile traces functional.hgt: True when the public op would run on triton for
    inputs like these, so the caller calls hgt_triton instead (the kernels then enter the graph).
    Only metadata of the (fake) tensors is read; autocast keeps the opaque op (its casts)."""
    if torch.is_autocast_enabled(x.device.type):
        return False
    dropout = seed is not None and config.dropout > 0
    return _triton_would_run(config.key, x.dtype, x.device, ids is not None, dropout, backend)


@torch._dynamo.assume_constant_result
def _triton_would_run(config_key: str, dtype: torch.dtype, device: torch.device, has_ids: bool,
                      dropout: bool, backend: str) -> bool:
    """Eagerly, at trace time: does backends.select pick triton (first-use check included) for a
    random probe of this config, dtype, device and dropout setting?"""
    config = HGTConfig.from_key(config_key)
    generator = torch.Generator().manual_seed(0)
    rows = first_use_check.PROBE_ROWS
    x = torch.randn(rows, config.in_dim, generator=generator).to(device=device, dtype=dtype)
    params = [(torch.randn(shape, generator=generator) * 0.5).to(device=device, dtype=dtype)
              for shape in config.param_shapes()]
    ids = torch.arange(rows, device=device) if has_ids else None
    inputs = OpInputs(x, ids, params, config, 1.0, 12345 if dropout else None)
    try:
        return select(backend, inputs).name == "triton"
    except BackendUnavailableError:  # the opaque op raises it, with its message, when it runs
        return False


# The autograd rule shared with the public ops; registered here, where the triton_op is defined,
# so importing the package does not define triton_ops (defining one imports triton).
from .. import autograd as _autograd  # noqa: E402

triton_hgt_forward.register_autograd(_autograd._backward, setup_context=_autograd._setup_context_triton)
