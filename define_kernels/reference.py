"""Pure-PyTorch forward of the HGT stack: the executable form of docs/math.md §2.

Every backend is checked against `hgt_forward`; its gradients come from autograd. It runs on any
device and dtype (float64 for gradcheck). Low-precision inputs are computed in their dtype by
PyTorch's own kernels, whose matmuls and LayerNorm statistics accumulate in fp32.

Dropout masks come from `dropout_keep_mask`, a counter-based hash of
(seed, layer, row key, feature) that every backend reproduces bit for bit, so a mask is
regenerated in backward instead of stored, and backends can be compared with dropout on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import contract
from .codes import InputKind
from .config import INPUT_CONCAT, INPUT_MIX, INPUT_PREV, INPUT_PROJ, INPUT_X, LN_EPS, HGTConfig

_MASK32 = 0xFFFFFFFF


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values, or on a Python int."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """Integer threshold on a 24-bit uniform draw: keep a feature when draw >= threshold."""
    return int(p * (1 << 24))


def dropout_keep_mask(seed: int, layer: int, row_keys: torch.Tensor, width: int,
                      p: float) -> torch.Tensor:
    """Boolean keep-mask [rows, width] for `layer` (0-based over all L layers).

    draw = fmix32(fmix32(fmix32(seed ^ fmix32(layer)) ^ row_key) ^ feature) >> 8, a 24-bit
    uniform; row_key is the token id when the op gathers by id (so a token's mask does not
    depend on where or how often it occurs: dedup stays exact) and the row index otherwise.
    """
    device = row_keys.device
    h = _fmix32(torch.tensor((seed & _MASK32) ^ int(_fmix32(torch.tensor(layer))), device=device))
    return _keep_from_layer_hash(h, row_keys, width, p)


def _keep_from_layer_hash(h: torch.Tensor, row_keys: torch.Tensor, width: int, p: float) -> torch.Tensor:
    """The row and feature steps of the hash, from the per-layer part h (0-d int64)."""
    h = _fmix32(h ^ (row_keys.to(torch.int64) & _MASK32))
    features = torch.arange(width, device=row_keys.device, dtype=torch.int64)
    h = _fmix32(h[:, None] ^ features[None, :])
    return (h >> 8) >= dropout_threshold(p)


# The map dropout's layer key in the hash (token mode, define.py): never a layer index.
MAP_DROPOUT_LAYER = 0xFFFFFFFF


def map_dropout_keep_mask(seed: torch.Tensor, ids: torch.Tensor, width: int, p: float) -> torch.Tensor:
    """Keep-mask [len(ids), width] of token-mode map dropout: the hash of dropout_keep_mask with
    layer MAP_DROPOUT_LAYER and row key the token id, so a token's mask does not depend on its
    position (dedup stays exact). seed: a 0-d int64 tensor (traceable: no int(seed))."""
    h = _fmix32((seed.to(device=ids.device, dtype=torch.int64) & _MASK32) ^ _fmix32(MAP_DROPOUT_LAYER))
    return _keep_from_layer_hash(h, ids, width, p)


def mix_input(x: torch.Tensor, h: torch.Tensor, groups: int) -> torch.Tensor:
    """Split-and-mix skip (docs/math.md §2): per group j, chunk j of x followed by chunk j of h."""
    rows = x.shape[0]
    x_chunks = x.reshape(rows, groups, x.shape[1] // groups)
    h_chunks = h.reshape(rows, groups, h.shape[1] // groups)
    return torch.cat([x_chunks, h_chunks], dim=2).reshape(rows, x.shape[1] + h.shape[1])


def layer_input(kind: str, x: torch.Tensor, h: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """Layer input from the stack input x and the previous output h (the in-proj reads the op's
    input, passed as x: it runs before any x' exists)."""
    if kind in (INPUT_X, INPUT_PROJ):
        return x
    if kind == INPUT_MIX:
        return mix_input(x, h, groups)
    if kind == INPUT_CONCAT:
        return torch.cat([x, h], dim=1)
    assert kind == INPUT_PREV, kind
    return h


def grouped_linear(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """u [T, a] viewed as [T, g, a/g]; group j: u_j @ W[j] + b[j]; returns [T, g, w/g]."""
    groups = weight.shape[0]
    u_grouped = u.reshape(u.shape[0], groups, u.shape[1] // groups).transpose(0, 1)  # [g, T, a/g]
    return torch.baddbmm(bias.unsqueeze(1), u_grouped, weight).transpose(0, 1)  # [T, g, w/g]


def feature_shuffle(z: torch.Tensor) -> torch.Tensor:
    """[T, g, c] -> transpose to [T, c, g] -> flatten -> view as [T, g, c]."""
    return z.transpose(1, 2).reshape(z.shape)


def activation(z: torch.Tensor, act: Optional[str]) -> torch.Tensor:
    if act is None:
        return z
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[act](z)


def split_params(params: Sequence[torch.Tensor], config: HGTConfig) -> list:
    """The flat op parameter list as per-layer (weight, bias, norm_weight, norm_bias) tuples."""
    return [tuple(params[layer.param_offset:layer.param_offset + layer.num_params])
            + (None,) * (4 - layer.num_params) for layer in contract.plan(config).layers]


def input_rows(x: torch.Tensor, ids: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The stack input: rows of x gathered by ids (the Map lookup) or x itself, times scale."""
    rows = x if ids is None else F.embedding(ids, x)
    return rows * scale if scale != 1.0 else rows


def hgt_stack(x: torch.Tensor, row_keys: torch.Tensor, params: Sequence[torch.Tensor],
              config: HGTConfig, seed: Optional[int] = None,
              saved: Optional[list] = None) -> torch.Tensor:
    """The L layers of docs/math.md §2 on stack input x [T, p]; row_keys [T] key the dropout masks.
    When `saved` is a list, the save policy's activations are appended to it (contract.Plan.
    saved_shapes: each layer's pre-norm output and, from layer 1 on, its input)."""
    rows = x.shape[0]
    h = None
    for layer, (weight, bias, norm_weight, norm_bias) in zip(contract.plan(config).layers,
                                                              split_params(params, config)):
        u = layer_input(layer.kind.label, x, h, layer.groups)
        z = grouped_linear(u, weight, bias)
        if saved is not None:
            if layer.index:
                saved.append(u)
            saved.append((feature_shuffle(z) if config.shuffle else z).reshape(rows, layer.out_features))
        h = _epilogue(z, layer.index, norm_weight, norm_bias, config, row_keys, seed)
        if layer.kind == InputKind.PROJ:
            x = h  # the in-proj's output is the x of every later layer
    return h


def apply_dropout(z: torch.Tensor, index: int, config: HGTConfig, row_keys: torch.Tensor,
                  seed: Optional[int]) -> torch.Tensor:
    """Layer `index`'s hashed dropout (config.layer_dropout(index)); identity without a seed."""
    p = config.layer_dropout(index)
    if seed is None or p == 0:
        return z
    keep = dropout_keep_mask(seed, index, row_keys, z.shape[1], p)
    return z * keep.to(z.dtype) / (1.0 - p)


def row_keys_for(x: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Dropout row keys: the token ids when gathering by id, else the row index."""
    return ids if ids is not None else torch.arange(x.shape[0], device=x.device)


def hgt_forward(x: torch.Tensor, ids: Optional[torch.Tensor], params: Sequence[torch.Tensor],
                config: HGTConfig, scale: float = 1.0, seed: Optional[int] = None) -> torch.Tensor:
    """y [T, m] for x [T, p] (ids None) or for a table x [V, p] gathered by 1-D ids [T].

    Dropout (config.dropout) is applied only when a seed is given, i.e. in training.
    """
    return hgt_stack(input_rows(x, ids, scale), row_keys_for(x, ids), params, config, seed)


def hgt_backward(grad_y: torch.Tensor, x: torch.Tensor, ids: Optional[torch.Tensor],
                 params: Sequence[torch.Tensor], config: HGTConfig, scale: float = 1.0,
                 seed: Optional[int] = None):
    """Gradients by autograd through the forward, recomputed from the inputs.

    Returns (grad_rows, grad_params); grad_rows [T, p] is per gathered row (ids given: the
    caller scatters it into the table) or per row of x. Needs autograd: where it runs inside a
    custom op, the caller re-enables it (backends/torch_reference.py).
    """
    with torch.enable_grad():
        rows = input_rows(x.detach(), ids, 1.0).requires_grad_(True)
        leaves = [p.detach().requires_grad_(True) for p in params]
        stack_in = rows * scale if scale != 1.0 else rows
        y = hgt_stack(stack_in, row_keys_for(x, ids), leaves, config, seed)
        grads = torch.autograd.grad(y, [rows] + leaves, grad_y.to(y.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [rows] + leaves)]
    return grads[0], grads[1:]


# ----------------------------------------------------------------------------- "save" policy
# The forward also returns what the backward needs, so backward reruns no GEMM: the activations
# of contract.Plan.saved_shapes (each layer's pre-norm output and, from layer 1 on, its input).


def _unshuffle(pre: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of feature_shuffle on [T, g, c] (returned as [T, g, c])."""
    rows, width = pre.shape
    return pre.reshape(rows, width // groups, groups).transpose(1, 2)


def _epilogue(z: torch.Tensor, index: int, norm_weight, norm_bias, config: HGTConfig,
              row_keys: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
    """From the grouped-linear output z [T, g, c] (pre-shuffle) to the layer output [T, w]."""
    rows = z.shape[0]
    if config.shuffle:
        z = feature_shuffle(z)
    if norm_weight is not None:
        z = F.layer_norm(z, norm_weight.shape, norm_weight, norm_bias, LN_EPS)
    width = config.layers[index].out_features  # not -1: an empty batch has no inferable width
    z = activation(z, config.layer_act(index)).reshape(rows, width)
    return apply_dropout(z, index, config, row_keys, seed)


def hgt_forward_saving(x: torch.Tensor, ids: Optional[torch.Tensor], params: Sequence[torch.Tensor],
                       config: HGTConfig, scale: float = 1.0, seed: Optional[int] = None):
    """(y, saved): y is hgt_forward's, saved the activations of contract.Plan.saved_shapes."""
    saved = []
    y = hgt_stack(input_rows(x, ids, scale), row_keys_for(x, ids), params, config, seed, saved)
    return y, saved


def _split_input_grad(kind: str, grad_u: torch.Tensor, p: int, groups: int):
    """Gradient of a layer input -> (stack-input part or None, previous-output part or None)."""
    if kind in (INPUT_X, INPUT_PROJ):
        return grad_u, None
    if kind == INPUT_PREV:
        return None, grad_u
    if kind == INPUT_CONCAT:
        return grad_u[:, :p], grad_u[:, p:]
    rows = grad_u.shape[0]
    grouped = grad_u.reshape(rows, groups, grad_u.shape[1] // groups)  # explicit: rows may be 0
    xg = p // groups
    return grouped[:, :, :xg].reshape(rows, p), grouped[:, :, xg:].reshape(rows, grad_u.shape[1] - p)


def hgt_backward_saved(grad_y: torch.Tensor, x: torch.Tensor, ids: Optional[torch.Tensor],
                       params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor],
                       config: HGTConfig, scale: float = 1.0, seed: Optional[int] = None):
    """(grad_rows, grad_params) as hgt_backward, from hgt_forward_saving's saved tensors: per
    layer, autograd through the elementwise epilogue only, then the GEMM gradients explicitly."""
    stack_in = input_rows(x.detach(), ids, scale)
    keys = row_keys_for(x, ids)
    rows, p = stack_in.shape[0], config.in_dim
    layer_params = split_params(params, config)
    grad_params = [None] * len(params)
    offsets = [layer.param_offset for layer in contract.plan(config).layers]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # grad_x: of the x the layers read (the in-proj's output when there is one), then of the op's input
    grad_x = torch.zeros(rows, p, dtype=acc_dtype, device=x.device)
    gh = grad_y
    for index in reversed(range(len(config.layers))):
        layer = config.layers[index]
        weight, bias, norm_weight, norm_bias = layer_params[index]
        g = layer.groups
        if layer.input_kind == INPUT_PROJ:  # its output is x': every skip read's gradient adds up here
            gh = grad_x.to(grad_y.dtype) if gh is None else (grad_x + gh).to(grad_y.dtype)
            grad_x = torch.zeros(rows, layer.in_features, dtype=acc_dtype, device=x.device)
        u = saved[2 * index - 1] if index else stack_in
        pre = saved[2 * index]
        with torch.enable_grad():
            z = _unshuffle(pre, g) if config.shuffle else pre.reshape(rows, g, layer.out_features // g)
            z = z.detach().requires_grad_(True)
            affine = [t.detach().requires_grad_(True) for t in (norm_weight, norm_bias) if t is not None]
            out = _epilogue(z, index, *(affine or [None, None]), config, keys, seed)
            grads = torch.autograd.grad(out, [z] + affine, gh.to(out.dtype))
        gz = grads[0]                                                     # [T, g, c]
        gz_grouped = gz.transpose(0, 1)                                   # [g, T, c]
        u_grouped = u.reshape(rows, g, layer.in_features // g).transpose(0, 1)  # [g, T, a/g]
        offset = offsets[index]
        grad_params[offset] = torch.bmm(u_grouped.transpose(1, 2), gz_grouped)
        grad_params[offset + 1] = gz.sum(0)
        for k, grad in enumerate(grads[1:]):
            grad_params[offset + 2 + k] = grad
        grad_u = torch.bmm(gz_grouped, weight.transpose(1, 2)).transpose(0, 1).reshape(rows, layer.in_features)
        grad_in, gh = _split_input_grad(layer.input_kind, grad_u, p, g)
        if grad_in is not None:
            grad_x += grad_in
    grad_rows = (grad_x * scale if scale != 1.0 else grad_x).to(x.dtype)
    return grad_rows, grad_params
