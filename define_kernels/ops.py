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

Activation policy (`hgt(..., activations=)`): "recompute" runs hgt_forward, whose backward
reruns the forward from the inputs (nothing but the inputs is kept: least memory); "save" runs
hgt_forward_saving, which also returns the activations its backward needs
(contract.Plan.saved_shapes: two [T, width] tensors per layer), so backward does no forward GEMM;
"auto" is backends.DEFAULT_POLICY for the device. Without autograd, both run hgt_forward.

Autocast (CPU and CUDA): under torch.autocast the forward ops compute in the autocast dtype from
the given (fp32) tensors and return that dtype; gradients reach the fp32 tensors in fp32 through
the casts. With ids and no dropout only the gathered rows are cast, not the table.

The ops are opaque to torch.compile (fullgraph-safe); `register_fake` gives their shapes. Where
the triton backend would run, `hgt` under torch.compile calls its triton_ops instead, so the graph
holds the Triton kernels (backends/triton_library.py).
"""
from __future__ import annotations

import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import backends, contract, table_grad_cache
from .backends import cpp_ext
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


def _setup_context(ctx, inputs, output):
    x, ids, params, config, scale, seed, backend, *sparse_grad = inputs
    ctx.save_for_backward(x, ids, seed, *params)
    ctx.config, ctx.scale, ctx.backend = config, scale, backend
    _keep_sparse_grad(ctx, inputs, sparse_grad)


def _keep_sparse_grad(ctx, inputs, sparse_grad):
    ctx.sparse_grad = bool(sparse_grad and sparse_grad[0])


def _grads_per_input(ctx, grad_table, grad_params):
    # One entry per input as autograd recorded them: it leaves out sparse_grad when it has its
    # default value, and needs_input_grad has that structure.
    return (grad_table, None, list(grad_params)) + (None,) * (len(ctx.needs_input_grad) - 3)


def _backward(ctx, grad_y):
    x, ids, seed, *params = ctx.saved_tensors
    grad_rows, grad_params = hgt_backward(grad_y, x, ids, params, ctx.config, ctx.scale, seed,
                                          ctx.backend)
    return _grads_per_input(ctx, _table_grad(x, ids, grad_rows, ctx.sparse_grad), grad_params)


def _table_grad(x, ids, grad_rows, sparse_grad=False):
    if ids is None:
        return grad_rows
    if sparse_grad:  # one row per gathered id, uncoalesced, as nn.Embedding(sparse=True)
        return torch.sparse_coo_tensor(ids.unsqueeze(0).to(torch.int64), grad_rows.to(x.dtype),
                                       x.shape, check_invariants=False)
    # rows -> table: summed per id, dense like nn.Embedding's default gradient
    if x.is_contiguous():
        return _rows_to_table(x.shape[0], ids, grad_rows.to(x.dtype), table=x)
    return torch.zeros_like(x).index_add_(0, ids, grad_rows.to(x.dtype))


def _rows_to_table(num_rows, ids, grad_rows, table=None):
    """zeros [num_rows, width] + grad_rows at ids; on CPU without writing the whole table when
    the C++ library is loaded: into the buffer of an earlier backward when `table` is a leaf
    parameter (table_grad_cache), else into a fresh one (cpp_ext.table_grad)."""
    grad = table_grad_cache.dense_grad(table, ids, grad_rows)
    if grad is None:
        grad = cpp_ext.table_grad(num_rows, ids, grad_rows)
    if grad is not None:
        return grad
    return grad_rows.new_zeros(num_rows, grad_rows.shape[1]).index_add_(0, ids, grad_rows)


class _GatherRows(torch.autograd.Function):
    """x[ids] (x 2-D, ids 1-D) whose backward is _rows_to_table: x's dense gradient without a
    fill of x's size, and several times faster on CPU than index_select's index_add."""

    @staticmethod
    def forward(x, ids):
        return x.index_select(0, ids)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ids = inputs
        ctx.save_for_backward(ids)
        ctx.num_rows, ctx.dtype = x.shape[0], x.dtype
        ctx.table = weakref.ref(x)  # the key of its reused gradient buffer, not kept alive

    @staticmethod
    def backward(ctx, grad_rows):
        (ids,) = ctx.saved_tensors
        return _rows_to_table(ctx.num_rows, ids, grad_rows.to(ctx.dtype), table=ctx.table()), None


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[ids] for a 2-D x and 1-D ids, differentiable in x (see _GatherRows)."""
    return _GatherRows.apply(x, ids)


hgt_forward.register_autograd(_backward, setup_context=_setup_context)


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


def _setup_context_saving(ctx, inputs, output):
    x, ids, params, config, scale, seed, backend, *sparse_grad = inputs
    _, saved = output
    ctx.mark_non_differentiable(*saved)
    # The saved activations never get a gradient: without this autograd would fill a zero
    # tensor per saved activation on every backward (two [T, width] buffers per layer).
    ctx.set_materialize_grads(False)
    ctx.num_params = len(params)
    ctx.save_for_backward(x, ids, seed, *params, *saved)
    ctx.config, ctx.scale, ctx.backend = config, scale, backend
    _keep_sparse_grad(ctx, inputs, sparse_grad)


def _backward_saving(ctx, grad_y, _grad_saved):
    x, ids, seed, *rest = ctx.saved_tensors
    if grad_y is None:  # y itself reached the loss through nothing differentiable
        return _grads_per_input(ctx, None, [None] * ctx.num_params)
    params, saved = rest[:ctx.num_params], rest[ctx.num_params:]
    grad_rows, grad_params = hgt_backward_saved(grad_y, x, ids, params, saved, ctx.config,
                                                ctx.scale, seed, ctx.backend)
    return _grads_per_input(ctx, _table_grad(x, ids, grad_rows, ctx.sparse_grad), grad_params)


hgt_forward_saving.register_autograd(_backward_saving, setup_context=_setup_context_saving)


# ----------------------------------------------------------------------------- autocast
def _autocast_inputs(device_type, x, ids, params, seed, sparse_grad=False):
    """The op's inputs cast to the current autocast dtype (as torch.library.register_autocast
    casts, but following the autocast region's dtype instead of one fixed at registration)."""
    dtype = torch.get_autocast_dtype(device_type)

    def eligible(t):
        return t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64

    if not eligible(x):
        return x, ids, params
    if ids is not None and seed is None and x.dtype != dtype:
        # Gather first so only the batch's rows are cast; with dropout the row keys must stay
        # the token ids, so the table is cast whole instead.
        x, ids = (F.embedding(ids, x, sparse=True) if sparse_grad else gather_rows(x, ids)), None
    return x.to(dtype), ids, [p.to(dtype) if eligible(p) else p for p in params]


def _register_autocast(op, device_type):
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, x, ids, params, config, scale, seed, backend, sparse_grad=False):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            cast_x, cast_ids, params = _autocast_inputs(device_type, x, ids, params, seed, sparse_grad)
            # gathered before the op (cast_ids None): the sparse gradient comes from F.embedding
            return op._opoverload(cast_x, cast_ids, params, config, scale, seed, backend,
                                  sparse_grad and cast_ids is not None)

    op._lib.impl(op._name, kernel, key, with_keyset=True)


for _op in (hgt_forward, hgt_forward_saving):
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_op, _device_type)


def hgt(x: torch.Tensor, params: List[torch.Tensor], config: HGTConfig, *,
        ids: Optional[torch.Tensor] = None, scale: float = 1.0,
        seed: Optional[torch.Tensor] = None, backend: str = "auto",
        activations: str = "auto", sparse_grad: bool = False) -> torch.Tensor:
    """Functional form of the op taking an HGTConfig; see the module docstring."""
    if sparse_grad and ids is None:
        raise ValueError("sparse_grad needs ids (a table gathered by the op)")
    policy = backends.resolve_activation_policy(backends.check_activation_policy(activations),
                                                x.device, x.dtype, backend)
    params = list(params)
    if policy == backends.RECOMPUTE and torch.compiler.is_compiling():
        # the triton backend as triton_ops, so Inductor sees its kernels (backends/triton_library.py)
        from .backends import triton_library
        if triton_library.traced_route(x, ids, config, seed, backend):
            return triton_library.hgt_triton(x, params, config, ids=ids, scale=scale, seed=seed)
    if policy == backends.SAVE and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)):
        return hgt_forward_saving(x, ids, params, config.key, float(scale), seed, backend,
                                  bool(sparse_grad))[0]
    return hgt_forward(x, ids, params, config.key, float(scale), seed, backend, bool(sparse_grad))


from .seed import draw_seed  # noqa: E402,F401  (kept here for callers of ops.draw_seed)
