"""`DeFINE`: Map -> (in-proj) -> HGT expand/reduce, an nn.Embedding-like module (SPEC §1-3)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .checks import check_ids_dtype, check_ids_in_range, check_positive_int, check_same_device
from .config import LN_EPS, HGTConfig
from .hgt import HGT
from .inference_cache import InferenceCache
from .reference import activation


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class DeFINE(nn.Module):
    """Deep Factorized Input token Embedding: ids [*] (int32/int64) -> [*, embedding_dim].

    Map: a [num_embeddings, map_dim] table (init N(0, map_dim^-1/2), output times sqrt(map_dim)
    with scale_map), then, with in_proj_dim=p, x = act(LN(Linear(e))), then the HGT stack of
    `HGTConfig(p, expand_dim, embedding_dim, depth, max_groups, **hgt_options)`.

    Parameters (names and shapes are stable: checkpoints are ported by them):
        map_weight               [num_embeddings, map_dim]
        in_proj.weight / .bias   [p, map_dim] / [p]         (only with in_proj_dim)
        in_proj_norm.weight/.bias [p]                        (only with in_proj_dim and norm)
        hgt.layers.{l}.weight    [g, a/g, w/g]
        hgt.layers.{l}.bias      [g, w/g]
        hgt.layers.{l}.norm_weight / norm_bias  [w/g]        (with norm)
    where (a, w, g) = self.config.layers[l]; the last layer is the reduce layer (g = 1, w = m).

    Behaviour:
        padding_idx: its map row is zero and gets no gradient, and its output is zero (as with
            nn.Embedding, padding contributes nothing to any gradient).
        dedup: the stack runs once per distinct id in the batch and is gathered back; exact,
            because the output depends only on the id (dropout masks are keyed by id too).
        cache: in eval mode, outputs come from a materialized [num_embeddings, m] table, rebuilt
            when any parameter changed or moved; train() never uses it.
        Under torch.compile, dedup and the cache are skipped (data-dependent shapes / state).
        sparse: the map table's gradient is a sparse tensor over the batch's rows (as
            nn.Embedding(sparse=True); use torch.optim.SparseAdam for map_weight). The gather
            then runs outside the fused op.
        backend: 'auto' (process default, see set_backend) or a registry name.
        activations: 'recompute', 'save' or 'auto' (per device), see ops.hgt.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, map_dim: int = 128,
                 expand_dim: int = 1024, depth: int = 4, max_groups: int = 8,
                 padding_idx: Optional[int] = None, in_proj_dim: Optional[int] = None,
                 scale_map: bool = True, map_dropout: float = 0.0, dedup: bool = True,
                 sparse: bool = False,
                 backend: str = "auto", cache: bool = True, cache_chunk_size: int = 4096,
                 activations: str = "auto", **hgt_options):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim),
                            ("map_dim", map_dim)):
            check_positive_int(name, value)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), "
                                 f"got {padding_idx}")
            padding_idx %= num_embeddings
        if not 0.0 <= map_dropout < 1.0:
            raise ValueError(f"map_dropout must be in [0, 1), got {map_dropout!r}")
        self.num_embeddings, self.embedding_dim, self.map_dim = num_embeddings, embedding_dim, map_dim
        self.padding_idx, self.dedup, self.map_dropout = padding_idx, dedup, map_dropout
        self.sparse = sparse
        self.scale = math.sqrt(map_dim) if scale_map else 1.0
        self.config = HGTConfig(in_proj_dim or map_dim, expand_dim, embedding_dim, depth, max_groups,
                                **hgt_options)
        self.map_weight = nn.Parameter(torch.empty(num_embeddings, map_dim))
        if in_proj_dim is not None:
            self.in_proj = nn.Linear(map_dim, in_proj_dim)
            self.in_proj_norm = nn.LayerNorm(in_proj_dim, eps=LN_EPS) if self.config.norm else None
        else:
            self.in_proj = self.in_proj_norm = None
        self.hgt = HGT(self.config, backend, activations)
        self.use_cache = cache
        self.cache = InferenceCache(cache_chunk_size)
        self.reset_parameters()

    @property
    def backend(self) -> str:
        return self.hgt.backend

    def reset_parameters(self) -> None:
        nn.init.normal_(self.map_weight, std=self.map_dim ** -0.5)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.map_weight[self.padding_idx].zero_()
        for layer in self.hgt.layers:
            layer.reset_parameters()
        self.cache.clear()

    # ------------------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids_dtype(ids)
        check_same_device(ids, "ids", self.map_weight.device)
        flat = ids.reshape(-1)
        if _is_compiling():
            y = self._embed(flat)
        elif not self.training and self.use_cache:
            check_ids_in_range(flat, self.num_embeddings)
            table = self.cache.get(list(self.parameters()), self.num_embeddings, self._embed)
            y = F.embedding(flat, table)
        elif self.dedup and flat.numel() > 0:
            unique, inverse = torch.unique(flat, return_inverse=True)  # range checked in _embed / the op
            y = self._embed(unique)[inverse]
        else:
            y = self._embed(flat)
        return y.reshape(*ids.shape, self.embedding_dim)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The live stack for 1-D ids -> [len(ids), m] (no dedup, no cache)."""
        seed = self.hgt.dropout_seed()
        params = self.hgt.op_params()
        if self.in_proj is None and not self.sparse and not (self.training and self.map_dropout > 0):
            # Fused path: the op gathers and scales the map rows itself.
            y = ops.hgt(self.map_weight, params, self.config, ids=ids, scale=self.scale,
                        seed=seed, backend=self.backend, activations=self.hgt.activations)
        else:
            if not _is_compiling():
                check_ids_in_range(ids, self.num_embeddings)
            x = F.embedding(ids, self.map_weight, sparse=self.sparse) * self.scale
            x = F.dropout(x, self.map_dropout, self.training)
            if self.in_proj is not None:
                x = self.in_proj(x)
                if self.in_proj_norm is not None:
                    x = self.in_proj_norm(x)
                x = activation(x, self.config.act)
            y = ops.hgt(x, params, self.config, seed=seed, backend=self.backend,
                        activations=self.hgt.activations)
        if self.padding_idx is not None:
            y = y * (ids != self.padding_idx).unsqueeze(1).to(y.dtype)
        return y

    # ------------------------------------------------------------------------------ counting
    def parameter_counts(self) -> dict:
        """Parameters split into map (the table), transform (in-proj + HGT) and total."""
        mapped = self.map_weight.numel()
        total = sum(p.numel() for p in self.parameters())
        return {"map": mapped, "transform": total - mapped, "total": total}

    @property
    def macs_per_token(self) -> int:
        in_proj = self.in_proj.weight.numel() if self.in_proj is not None else 0
        return in_proj + self.config.macs_per_token

    def extra_repr(self) -> str:
        options = [f"{self.num_embeddings}, {self.embedding_dim}", f"map_dim={self.map_dim}"]
        if self.padding_idx is not None:
            options.append(f"padding_idx={self.padding_idx}")
        options += [f"dedup={self.dedup}", f"sparse={self.sparse}", f"cache={self.use_cache}"]
        return ", ".join(options)
