"""Host-side tables of the `triton` backend: constexpr layouts, dropout bases, packed parameters.

Pure Python and torch (no triton import), shared by triton_hgt.py (the launches) and the
offline compile checks. See triton_hgt.py for the design.
"""
from __future__ import annotations

import collections
import functools
import math

import torch

from .. import contract
from ..codes import InputKind
from ..config import HGTConfig
from ..reference import _MASK32, _fmix32


def _cumulative(widths) -> tuple:
    offsets, total = [], 0
    for width in widths:
        offsets.append(total)
        total += width
    return tuple(offsets)


def _kernel_kind(kind: InputKind) -> InputKind:
    """The kernels read the in-proj's input as a first layer reads x (IN_PROJ says the rest)."""
    return InputKind.X if kind == InputKind.PROJ else kind


@functools.lru_cache(maxsize=64)
def stack_layout(config: HGTConfig, save: bool) -> dict:
    """Constexpr tables of the kernels: per-layer shapes, packed parameter and scratch offsets.

    save=False: z reuses one max_w-wide scratch, h ping-pongs between two (forward only).
    save=True: every layer gets its own z and h columns (kept for the backward).
    With an in-proj (IN_PROJ), its output x' stays in h at XP_OFF for every later layer's skip
    read: its own p columns after the ping-pong pair when save=False.
    """
    plan = contract.plan(config)
    layers = plan.layers
    widths = [layer.out_features for layer in layers]
    offsets = {"W_OFF": [], "B_OFF": [], "NW_OFF": [], "NB_OFF": []}
    position = 0
    for layer in layers:
        names = ["W_OFF", "B_OFF"] + (["NW_OFF", "NB_OFF"] if layer.has_norm else [])
        for name, shape in zip(names, layer.param_shapes):
            offsets[name].append(position)
            position += math.prod(shape)
        if not layer.has_norm:
            offsets["NW_OFF"].append(0)
            offsets["NB_OFF"].append(0)
    widest = max(widths)
    if save:
        z_off, h_off = _cumulative(widths), _cumulative(widths[:-1]) + (0,)
        z_width, h_width = sum(widths), max(sum(widths[:-1]), 1)
    else:
        z_off = (0,) * len(layers)
        h_off = tuple((index % 2) * widest for index in range(len(layers) - 1)) + (0,)
        z_width, h_width = widest, 2 * widest
        if config.has_in_proj:
            h_off = (2 * widest,) + h_off[1:]
            h_width += config.in_dim
    return dict(
        IN=tuple(layer.in_features for layer in layers), OUT=tuple(widths),
        GROUPS=tuple(layer.groups for layer in layers),
        KINDS=tuple(int(_kernel_kind(layer.kind)) for layer in layers),
        PREV_W=(0,) + tuple(widths[:-1]),
        NORMS=tuple(layer.has_norm for layer in layers),
        ACTS=tuple(int(layer.act) for layer in layers),
        **{name: tuple(values) for name, values in offsets.items()},
        Z_OFF=z_off, H_OFF=h_off, HIN_OFF=(0,) + h_off[:-1],
        P=config.in_dim, NUM_LAYERS=len(layers), SHUFFLE=config.shuffle,
        IN_PROJ=config.has_in_proj, XP_OFF=h_off[0],
        z_width=z_width, h_width=h_width, num_params=position)


def dropout_bases(seed: int, num_layers: int, device) -> torch.Tensor:
    """fmix32(seed ^ fmix32(layer)) per layer: the per-layer start of the dropout hash."""
    return torch.tensor([_fmix32((seed & _MASK32) ^ _fmix32(layer)) for layer in range(num_layers)],
                        dtype=torch.int64, device=device)


class PackedParams:
    """Flat copies of parameter lists, one per list (keyed by the tensors' addresses and shapes,
    so two modules do not evict each other), each rebuilt only when one of its parameters
    changed (version counter: an in-place update). An entry holds the tensors it was built from,
    so an address cannot be reused meanwhile; at most `slots` lists are kept, least recently
    used dropped first."""

    def __init__(self, slots: int = 4):
        self.slots = slots
        self._entries: "collections.OrderedDict" = collections.OrderedDict()

    def get(self, params) -> torch.Tensor:
        key = tuple((p.data_ptr(), tuple(p.shape), p.dtype, p.device) for p in params)
        versions = tuple(p._version for p in params)
        entry = self._entries.pop(key, None)
        if entry is None or entry[0] != versions:
            entry = None  # free the stale copy first
            entry = (versions, list(params), torch.cat([p.detach().reshape(-1) for p in params]))
        self._entries[key] = entry
        while len(self._entries) > self.slots:
            self._entries.popitem(last=False)
        return entry[2]


packed_params = PackedParams()


def dropout_bases_tensor(seed: torch.Tensor, num_layers: int, device) -> torch.Tensor:
    """dropout_bases from a 0-d int64 seed tensor, in torch ops (traceable: no int(seed))."""
    layers = _fmix32(torch.arange(num_layers, dtype=torch.int64, device=device))
    return _fmix32((seed.to(device=device, dtype=torch.int64) & _MASK32) ^ layers)


def _dropout_args(config: HGTConfig, seed, device):
    """seed: None, a Python int (registry path) or a 0-d tensor (the triton_op path)."""
    from ..reference import dropout_threshold
    if seed is None or not config.has_dropout:
        return False, torch.zeros(1, dtype=torch.int64, device=device), 0, 1.0
    if isinstance(seed, torch.Tensor):
        bases = dropout_bases_tensor(seed, len(config.layers), device)
    else:
        bases = dropout_bases(seed, len(config.layers), device)
    return True, bases, dropout_threshold(config.dropout), 1.0 / (1.0 - config.dropout)


def layer_dropout_args(config: HGTConfig, index: int) -> tuple:
    """(threshold, keep scale) of layer `index` (the in-proj has its own probability)."""
    from ..reference import dropout_threshold
    p = config.layer_dropout(index)
    return dropout_threshold(p), 1.0 / (1.0 - p)
