"""The public ops, defined once with torch.library; every backend runs behind them.

    define_kernels::hgt_forward(x, ids, params, config, scale, seed, backend, sparse_grad=False) -> y
    define_kernels::hgt_backward(grad_y, x, ids, params, config, scale, seed, backend)
        -> (grad_rows, grad_params)
    define_kernels::hgt_forward_saving(x, ids, params, config, scale, seed, backend, sparse_grad=False)
        -> (y, saved)
    define_kernels::hgt_backward_saved(grad_y, x, ids, params, saved, config, scale, seed, backend)
        -> (grad_rows, grad_params)

x is a dense input [T, p] (ids None) or a map table [V, p] gathered by 1-D ids [T]; the stack input
is those rows times `scale` (with an in-proj, x is [T, n] or [V, n]: its layer 0 reads them).
`sparse_grad` (ids given): the table's gradient is a sparse COO tensor over the gathered rows, as
nn.Embedding(sparse=True) gives (for torch.optim.SparseAdam). `config` is `HGTConfig.key`;
`seed` is a 0-d int64 CPU tensor in training with dropout, else None; `backend` is a registry name or 'auto'. Backward returns the
gradient per gathered row; the autograd rule scatters it into the table, so the op never
allocates a table-sized buffer itself.

The schemas and their fakes (shapes from contract.py) only: the autograd rule is autograd.py, the
autocast rule autocast.py, the functional entry `hgt` (activation policy, the Triton route under
torch.compile) functional.py, and the table-gradient policy table_gradient.py. The ops are opaque
to torch.compile (fullgraph-safe).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import backends, contract
from .checks import check_ids_in_range
from .config import HGTConfig


def _seed_value(seed: Optional[torch.Tensor]) -> Optional[int]:
    return None if seed is None else int(seed)


def _prepare(x, ids, params, config, scale, seed, backend, policy=backends.RECOMPUTE):
    cfg = HGTConfig.from_key(config)
    contract.check_inputs(x, ids, params, contract.plan(cfg))
    if ids is not None:
        check_ids_in_range(ids, x.shape[0])
    inputs = backends.OpInputs(x, ids, params, cfg, scale, _seed_value(seed))
    return backends.select(backend, inputs, policy), inputs


@torch.library.custom_op("define_kernels::hgt_forward", mutates_args=())
def hgt_forward(x: torch.Tensor, ids: Optional[torch.Tensor], params: List[torch.Tensor],
                config: str, scale: float, seed: Optional[torch.Tensor], backend: str,
                sparse_grad: bool = False) -> torch.Tensor:
    chosen, inputs = _prepare(x, ids, params, config, scale, seed, backend)
    return chosen.forward(*inputs)


@torch.library.custom_op("define_kernels::hgt_backward", mutates_args=())
def hgt_backward(grad_y: torch.Tensor, x: torch.Tensor, ids: Optional[torch.Tensor],
                 params: List[torch.Tensor], config: str, scale: float,
                 seed: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, List[torch.Tensor]]:
    chosen, inputs = _prepare(x, ids, params, config, scale, seed, backend)
    grad_rows, grad_params = chosen.backward(grad_y.contiguous(), *inputs)
    # Autograd can hand back grad_y itself (a one-row bias gradient); a custom op must not alias.
    grad_rows, *grad_params = _unaliased([grad_rows, *grad_params], [grad_y, x, *params])
    return grad_rows, _contiguous(grad_params)


def _contiguous(grads: List[torch.Tensor]) -> List[torch.Tensor]:
    """Parameter gradients laid out contiguously, as the fakes promise, whatever the parameter's
    strides (DeFINE passes its in-proj weight as a transposed view)."""
    return [g.contiguous() for g in grads]


def _unaliased(outputs: List[torch.Tensor], inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """`outputs`, each cloned where it shares storage with an input or an earlier output (custom
    ops may not return aliases). Empty tensors are always cloned: their storages all have data
    pointer 0, so the pointer cannot tell whether they alias."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    fresh = []
    for t in outputs:
        if t.numel() == 0 or t.untyped_storage().data_ptr() in taken:
            t = t.clone()
        if t.numel():
            taken.add(t.untyped_storage().data_ptr())
        fresh.append(t)
    return fresh


def _checked_plan(x, ids, params, config: str) -> contract.Plan:
    plan = contract.plan(HGTConfig.from_key(config))
    contract.check_inputs(x, ids, params, plan)
    return plan


@hgt_forward.register_fake
def _hgt_forward_fake(x, ids, params, config, scale, seed, backend, sparse_grad=False):
    return contract.forward_outputs(x, ids, _checked_plan(x, ids, params, config))


@hgt_backward.register_fake
def _hgt_backward_fake(grad_y, x, ids, params, config, scale, seed, backend):
    _checked_plan(x, ids, params, config)
    return contract.backward_outputs(x, ids, params)


# ----------------------------------------------------------------------------- "save" policy
@torch.library.custom_op("define_kernels::hgt_forward_saving", mutates_args=())
def hgt_forward_saving(x: torch.Tensor, ids: Optional[torch.Tensor], params: List[torch.Tensor],
                       config: str, scale: float, seed: Optional[torch.Tensor],
                       backend: str, sparse_grad: bool = False) -> tuple[torch.Tensor, List[torch.Tensor]]:
    chosen, inputs = _prepare(x, ids, params, config, scale, seed, backend, backends.SAVE)
    y, saved = chosen.forward_saving(*inputs)
    # Outputs may alias neither inputs nor each other (a layer without norm/act saves its output).
    y, *saved = _unaliased([y, *(t.contiguous() for t in saved)], [x, *params])
    return y, saved


@torch.library.custom_op("define_kernels::hgt_backward_saved", mutates_args=())
def hgt_backward_saved(grad_y: torch.Tensor, x: torch.Tensor, ids: Optional[torch.Tensor],
                       params: List[torch.Tensor], saved: List[torch.Tensor], config: str,
                       scale: float, seed: Optional[torch.Tensor],
                       backend: str) -> tuple[torch.Tensor, List[torch.Tensor]]:
    chosen, inputs = _prepare(x, ids, params, config, scale, seed, backend, backends.SAVE)
    x, ids, params, cfg, scale, seed_value = inputs
    grad_rows, grad_params = chosen.backward_saved(grad_y.contiguous(), x, ids, params, list(saved),
                                                   cfg, scale, seed_value)
    return grad_rows, _contiguous(list(grad_params))


@hgt_forward_saving.register_fake
def _hgt_forward_saving_fake(x, ids, params, config, scale, seed, backend, sparse_grad=False):
    return contract.forward_outputs(x, ids, _checked_plan(x, ids, params, config), saving=True)


@hgt_backward_saved.register_fake
def _hgt_backward_saved_fake(grad_y, x, ids, params, saved, config, scale, seed, backend):
    contract.check_saved(saved, x, ids, _checked_plan(x, ids, params, config))
    return contract.backward_outputs(x, ids, params)
