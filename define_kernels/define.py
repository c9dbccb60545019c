"""`DeFINE`: Map -> (in-proj) -> HGT expand/reduce, an nn.Embedding-like module (docs/math.md §1-3)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, delight_layout, functional, pretrained, reference, table_gradient
from .checks import (check_ids_dtype, check_ids_in_range, check_known_options, check_positive_int,
                     check_same_device)
from .config import LN_EPS, HGTConfig
from .hgt import HGT
from .inference_cache import InferenceCache
from .seed import draw_seed

# HGTConfig options DeFINE passes through **hgt_options (the rest it sets itself).
_HGT_OPTIONS = tuple(f.name for f in dataclasses.fields(HGTConfig)
                     if f.name not in ("in_dim", "expand_dim", "out_dim", "depth", "max_groups",
                                       "in_proj_from", "in_proj_dropout"))
MAP_DROPOUT_MODES = ("token", "sequence")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class DeFINE(nn.Module):
    """Deep Factorized Input token Embedding: ids [*] (int32/int64) -> [*, embedding_dim].

    Map: a [num_embeddings, map_dim] table (init N(0, map_dim^-1/2), output times sqrt(map_dim)
    with scale_map), then, with in_proj_dim=p, x = dropout(act(LN(Linear(e)))), then the HGT
    stack of `HGTConfig(p, expand_dim, embedding_dim, depth, max_groups, **hgt_options)`. The
    in-proj is layer 0 of that config (`in_proj_from=map_dim`) and runs inside the fused op.

    Parameters (names and shapes are stable: checkpoints are ported by them):
        map_weight               [num_embeddings, map_dim]
        in_proj.weight / .bias   [p, map_dim] / [p]         (only with in_proj_dim)
        in_proj_norm.weight/.bias [p]                        (only with in_proj_dim and norm)
        hgt.layers.{l}.weight    [g, a/g, w/g]
        hgt.layers.{l}.bias      [g, w/g]
        hgt.layers.{l}.norm_weight / norm_bias  [w/g]        (with norm)
    where (a, w, g) = self.config.layers[l + self.config.first_stack_layer] (the in-proj, when
    there is one, is config layer 0 and keeps its in_proj.* names).

    Behaviour:
        padding_idx: its map row is zero and gets no gradient, and its output is zero (as with
            nn.Embedding, padding contributes nothing to any gradient).
        dedup: the stack runs once per distinct id in the batch and is gathered back; exact,
            because the output depends only on the id (dropout masks are keyed by id too).
        cache: in eval mode, when no gradient can be needed (grad disabled, inference mode, or
            no parameter requires grad), outputs come from a [num_embeddings, m] table filled
            lazily per id (`materialize_cache()` fills it all) and dropped when any parameter
            changes or moves; otherwise the live stack runs. train() never uses it.
        Under torch.compile, dedup and the cache are skipped (data-dependent shapes / state);
        on the meta device too (no values).
        device / dtype: factory kwargs as for nn.Embedding (meta: then to_empty + reset_parameters).
        Checkpoints describe the options that change the function (see checkpoint.py); loading
        one saved with other options raises ValueError naming them, and zeroes the padding row.
        sparse: the map table's gradient is a sparse tensor over the batch's rows (as
            nn.Embedding(sparse=True); use torch.optim.SparseAdam for map_weight), returned by
            the fused op (functional.hgt(sparse_grad=True)).
        backend: 'auto' (process default, see set_backend) or a registry name.
        in_proj_dropout: dropout after the in-proj's activation (training only), hashed like
            the stack's (seed, layer 0, token id, feature).
        map_dropout_mode: "token" (default): map_dropout drops each token's features, with a
            mask hashed from (seed, token id, feature) (dedup stays exact while the stack has no
            dropout: the stack then runs on the dropped rows, its masks keyed by row).
            "sequence" (the authors' RecurrentDropout): ids [..., T] get one mask over the map
            features per sequence (the last axis; 1-D ids are one sequence), shared by its
            positions. Masks then depend on the sequence, not the id alone, so dedup is
            skipped in training while it is on (exact, not faster).
        init: "spec" or "xavier_3d" (the authors' init: Xavier over each whole 3-D GLT weight,
            Xavier weight and zero bias for the in-proj); see hgt.INITS.
        zero_padding_output: False keeps the stack's output at padding_idx (the authors' code).
        DeFINE.delight(...) builds the authors' layout, DeFINE.from_delight(state_dict) imports
            one of their checkpoints (define_kernels/delight.py).
        activations: 'recompute', 'save' or 'auto' (per device), see functional.hgt.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, map_dim: int = 128,
                 expand_dim: int = 1024, depth: int = 4, max_groups: int = 8,
                 padding_idx: Optional[int] = None, in_proj_dim: Optional[int] = None,
                 scale_map: bool = True, map_dropout: float = 0.0, dedup: bool = True,
                 sparse: bool = False,
                 backend: str = "auto", cache: bool = True, cache_chunk_size: int = 4096,
                 in_proj_dropout: float = 0.0, init: str = "spec", zero_padding_output: bool = True,
                 activations: str = "auto", map_dropout_mode: str = "token", device=None, dtype=None,
                 **hgt_options):
        super().__init__()
        check_known_options("DeFINE", hgt_options, _HGT_OPTIONS)
        factory = {"device": device, "dtype": dtype}
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
        if not 0.0 <= in_proj_dropout < 1.0:
            raise ValueError(f"in_proj_dropout must be in [0, 1), got {in_proj_dropout!r}")
        if in_proj_dropout and in_proj_dim is None:
            raise ValueError(f"in_proj_dropout ({in_proj_dropout!r}) needs an in-proj (in_proj_dim)")
        if in_proj_dim is not None:
            check_positive_int("in_proj_dim", in_proj_dim)
        if map_dropout_mode not in MAP_DROPOUT_MODES:
            raise ValueError(f"map_dropout_mode must be one of {MAP_DROPOUT_MODES}, "
                             f"got {map_dropout_mode!r}")
        self.map_dropout_mode = map_dropout_mode
        self.in_proj_dropout, self.init = in_proj_dropout, init
        self.zero_padding_output = bool(zero_padding_output)
        self.num_embeddings, self.embedding_dim, self.map_dim = num_embeddings, embedding_dim, map_dim
        self.padding_idx, self.dedup, self.map_dropout = padding_idx, dedup, map_dropout
        self.sparse, self.in_proj_dim, self.scale_map = sparse, in_proj_dim, scale_map
        self.scale = math.sqrt(map_dim) if scale_map else 1.0
        self.config = HGTConfig(in_proj_dim or map_dim, expand_dim, embedding_dim, depth, max_groups,
                                in_proj_from=map_dim if in_proj_dim is not None else None,
                                in_proj_dropout=in_proj_dropout, **hgt_options)
        self.map_weight = nn.Parameter(torch.empty(num_embeddings, map_dim, **factory))
        if in_proj_dim is not None:
            self.in_proj = nn.Linear(map_dim, in_proj_dim, **factory)
            self.in_proj_norm = (nn.LayerNorm(in_proj_dim, eps=LN_EPS, **factory)
                                 if self.config.norm else None)
        else:
            self.in_proj = self.in_proj_norm = None
        self.hgt = HGT(self.config, backend, init, activations, **factory)
        self.use_cache = cache
        self.cache = InferenceCache(cache_chunk_size)
        self._register_load_state_dict_pre_hook(checkpoint.add_legacy_extra_state)
        self.register_load_state_dict_post_hook(DeFINE._zero_padding_row_after_load)
        self.reset_parameters()

    from_embedding = classmethod(pretrained.from_embedding)

    @property
    def backend(self) -> str:
        return self.hgt.backend

    def reset_parameters(self) -> None:
        nn.init.normal_(self.map_weight, std=self.map_dim ** -0.5)
        self._zero_padding_row()
        if self.in_proj is not None:
            self.in_proj.reset_parameters()
            if self.init == "xavier_3d":  # the authors' in-proj init: Xavier weight, zero bias
                nn.init.xavier_uniform_(self.in_proj.weight)
                nn.init.zeros_(self.in_proj.bias)
            if self.in_proj_norm is not None:
                self.in_proj_norm.reset_parameters()
        self.hgt.reset_parameters()
        self.cache.clear()

    def _zero_padding_row(self) -> None:
        if self.padding_idx is not None:
            with torch.no_grad():
                self.map_weight[self.padding_idx].zero_()

    # ------------------------------------------------------------------------------ nn.Embedding parity
    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(
                "DeFINE has no [num_embeddings, embedding_dim] weight: it stores a map table "
                "`map_weight` [num_embeddings, map_dim] and the HGT stack. Use `map_weight` for the "
                "table (e.g. to tie an output layer: define_kernels.relatives.TiedOutput), or "
                "`materialize_cache()` in eval for the [num_embeddings, embedding_dim] output table.")
        return super().__getattr__(name)

    def get_extra_state(self) -> torch.Tensor:
        return checkpoint.encode(checkpoint.describe(self))

    def set_extra_state(self, state) -> None:
        saved = None if state is None else checkpoint.decode(state)
        if saved is not None:  # None: a checkpoint from before the description, loaded as before
            checkpoint.check_compatible(saved, checkpoint.describe(self))

    @staticmethod
    def _zero_padding_row_after_load(module: "DeFINE", incompatible_keys) -> None:
        # A table saved without padding_idx (or edited) must not leak a non-zero padding row,
        # which TiedOutput would use as logits.
        module._zero_padding_row()

    @torch.no_grad()
    def materialize_cache(self) -> torch.Tensor:
        """Fill the whole inference table now; returns it ([num_embeddings, embedding_dim])."""
        return self.cache.materialize(self._parameter_list(), self.num_embeddings, self._embed)

    def _parameter_list(self) -> list:
        """All parameters, by a plain walk of the module tree (4x cheaper than list(parameters()),
        which matters on the cache's hot path); the order is stable, as the fingerprint needs."""
        params, stack = [], [self]
        while stack:
            module = stack.pop()
            params.extend(p for p in module._parameters.values() if p is not None)
            stack.extend(m for m in module._modules.values() if m is not None)
        return params

    def _apply(self, fn, *args, **kwargs):
        self.cache.clear()  # moves and casts (to, half, cuda, to_empty): never serve the old table
        return super()._apply(fn, *args, **kwargs)

    def _serves_from_cache(self, ids: torch.Tensor) -> bool:
        """The cache only when no gradient can be needed: eval and (grad off or frozen params)."""
        if self.training or not self.use_cache or ids.numel() == 0 or ids.device.type == "meta":
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(p.requires_grad for p in self.parameters())

    # ------------------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids_dtype(ids)
        check_same_device(ids, "ids", self.map_weight.device)
        flat = ids.reshape(-1)
        if self._sequence_map_dropout_on():
            y = self._embed_sequence_dropout(ids)
        elif _is_compiling():
            y = self._embed(flat)
        elif self._serves_from_cache(flat):
            y = self.cache.lookup(flat, self._parameter_list(), self.num_embeddings, self._embed)
        elif self.dedup and flat.numel() > 0 and flat.device.type != "meta":
            unique, inverse = torch.unique(flat, return_inverse=True)  # range checked in _embed / the op
            y = table_gradient.gather_rows(self._embed(unique), inverse)  # backward: rows_to_table
        else:
            y = self._embed(flat)
        return y.reshape(*ids.shape, self.embedding_dim)

    def op_params(self) -> list:
        """The op's flat parameter list: the in-proj's (as views [1, n, p], [1, p], LN [p]) when
        there is one, then the HGT stack's."""
        if self.in_proj is None:
            return self.hgt.op_params()
        proj = [self.in_proj.weight.t().unsqueeze(0), self.in_proj.bias.unsqueeze(0)]
        if self.in_proj_norm is not None:
            proj += [self.in_proj_norm.weight, self.in_proj_norm.bias]
        return proj + self.hgt.op_params()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The live stack for 1-D ids -> [len(ids), m] (no dedup, no cache)."""
        seed = self.hgt.dropout_seed()
        params = self.op_params()
        if not (self.training and self.map_dropout > 0):
            # Fused path: the op gathers and scales the map rows itself (and runs the in-proj);
            # with sparse, it returns the table's gradient as a sparse tensor over those rows.
            y = functional.hgt(self.map_weight, params, self.config, ids=ids, scale=self.scale,
                               seed=seed, backend=self.backend, activations=self.hgt.activations,
                               sparse_grad=self.sparse)
        else:
            if not _is_compiling():
                check_ids_in_range(ids, self.num_embeddings)
            # Token-mode map dropout, hashed by (seed, token id, feature): one row per id keeps
            # its mask with or without dedup. The stack then runs on these rows (row-keyed).
            x = F.embedding(ids, self.map_weight, sparse=self.sparse) * self.scale
            # One draw per call: the stack's seed when it has one (its own layer key in the hash);
            # two seedless custom-op calls could be merged or reordered by the compiler.
            map_seed = seed if seed is not None else draw_seed()
            keep = reference.map_dropout_keep_mask(map_seed, ids, self.map_dim, self.map_dropout)
            x = x * keep.to(x.dtype) / (1.0 - self.map_dropout)
            y = functional.hgt(x, params, self.config, seed=seed, backend=self.backend,
                               activations=self.hgt.activations)
        return self._zero_padding_output(ids, y)

    def _zero_padding_output(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.padding_idx is not None and self.zero_padding_output:
            y = y * (ids != self.padding_idx).unsqueeze(1).to(y.dtype)
        return y

    def _sequence_map_dropout_on(self) -> bool:
        return self.map_dropout_mode == "sequence" and self.training and self.map_dropout > 0

    def _embed_sequence_dropout(self, ids: torch.Tensor) -> torch.Tensor:
        """Training with per-sequence map dropout: one mask [n] per sequence (ids' last axis),
        drawn from torch's generator, on the gathered rows; then the op over those dense rows.
        No dedup: a token's input depends on its sequence's mask."""
        if not _is_compiling():
            check_ids_in_range(ids, self.num_embeddings)
        e = F.embedding(ids, self.map_weight, sparse=self.sparse) * self.scale   # [..., T, n]
        keep = 1.0 - self.map_dropout
        mask_shape = (*ids.shape[:-1], 1, self.map_dim) if ids.dim() else (self.map_dim,)
        mask = torch.empty(mask_shape, device=e.device, dtype=e.dtype).bernoulli_(keep) / keep
        rows = (e * mask).reshape(-1, self.map_dim)
        y = functional.hgt(rows, self.op_params(), self.config, seed=self.hgt.dropout_seed(),
                           backend=self.backend, activations=self.hgt.activations)
        return self._zero_padding_output(ids.reshape(-1), y)

    # ------------------------------------------------------------------------------ authors' layout
    @classmethod
    def delight(cls, num_embeddings: int, embedding_dim: int, **options) -> "DeFINE":
        """The authors' DeFINE layout (define_kernels/delight_layout.py, `delight_define`)."""
        return delight_layout.delight_define(cls, num_embeddings, embedding_dim, **options)

    @classmethod
    def from_delight(cls, state_dict: dict, prefix: str = "", **options) -> "DeFINE":
        """A DeFINE holding one of the authors' DExTraEmb state dicts (`delight_layout.from_delight`)."""
        return delight_layout.from_delight(cls, state_dict, prefix, **options)

    # ------------------------------------------------------------------------------ counting
    def parameter_counts(self) -> dict:
        """Parameters split into map (the table), transform (in-proj + HGT) and total."""
        mapped = self.map_weight.numel()
        total = sum(p.numel() for p in self.parameters())
        return {"map": mapped, "transform": total - mapped, "total": total}

    @property
    def macs_per_token(self) -> int:
        return self.config.macs_per_token  # the in-proj is layer 0 of the config when on

    def extra_repr(self) -> str:
        options = [f"{self.num_embeddings}, {self.embedding_dim}", f"map_dim={self.map_dim}"]
        if self.padding_idx is not None:
            options.append(f"padding_idx={self.padding_idx}")
        options += [f"dedup={self.dedup}", f"sparse={self.sparse}", f"cache={self.use_cache}"]
        return ", ".join(options)
