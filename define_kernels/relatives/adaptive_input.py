"""Adaptive input representations (Baevski & Auli, ICLR 2019; docs/math.md §4).

The vocabulary, ordered by descending frequency, is cut into bands [0, c_0), [c_0, c_1), ...,
[c_last, V). Band i has its own table of width d / factor^i and a bias-free projection to d, so
rare words get fewer parameters. `AdaptiveDeFINE` uses it as DeFINE's Map layer (the paper's LM
experiments do so): ids -> AdaptiveInput(V, n) -> HGT stack -> [*, m].
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..config import HGTConfig
from ..hgt import HGT
from ..checks import check_positive_int
from ._checks import check_ids


def _check_cutoffs(cutoffs, num_embeddings) -> tuple:
    if isinstance(cutoffs, (str, bytes)) or not isinstance(cutoffs, Sequence):
        raise ValueError(f"cutoffs must be a sequence of ints, got {cutoffs!r}")
    cutoffs = tuple(cutoffs)
    previous = 0
    for cutoff in cutoffs:
        if isinstance(cutoff, bool) or not isinstance(cutoff, int) or not previous < cutoff < num_embeddings:
            raise ValueError(f"cutoffs must be increasing ints in (0, num_embeddings={num_embeddings}), "
                             f"got {list(cutoffs)}")
        previous = cutoff
    return cutoffs


class AdaptiveInput(nn.Module):
    """ids [*] (int32/int64) -> [*, embedding_dim] with per-band widths d / factor^i.

    Parameters, for band i of size s_i and width d_i = embedding_dim // factor^i:
        bands.{i}.weight  [s_i, d_i]   init N(0, d_i^-1/2) (as fairseq's AdaptiveInput)
        projs.{i}.weight  [d, d_i]     Xavier-uniform, no bias
    Total sum_i s_i*d_i + d*d_i.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, cutoffs: Sequence[int] = (),
                 factor: float = 4):
        super().__init__()
        check_positive_int("num_embeddings", num_embeddings)
        check_positive_int("embedding_dim", embedding_dim)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
            raise ValueError(f"factor must be a number >= 1, got {factor!r}")
        self.num_embeddings, self.embedding_dim, self.factor = num_embeddings, embedding_dim, factor
        self.cutoffs = _check_cutoffs(cutoffs, num_embeddings)
        edges = (0,) + self.cutoffs + (num_embeddings,)
        self.band_edges = tuple(zip(edges[:-1], edges[1:]))
        self.band_dims = tuple(int(embedding_dim // factor ** i) for i in range(len(self.band_edges)))
        if min(self.band_dims) < 1:
            raise ValueError(f"embedding_dim {embedding_dim} / factor {factor}^{len(self.band_dims) - 1} "
                             f"leaves a band of width 0; use fewer cutoffs or a smaller factor")
        self.bands = nn.ModuleList(nn.Embedding(end - start, dim)
                                   for (start, end), dim in zip(self.band_edges, self.band_dims))
        self.projs = nn.ModuleList(nn.Linear(dim, embedding_dim, bias=False) for dim in self.band_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for band, proj, dim in zip(self.bands, self.projs, self.band_dims):
            nn.init.normal_(band.weight, std=dim ** -0.5)
            nn.init.xavier_uniform_(proj.weight)

    def num_parameters_formula(self) -> int:
        return sum((end - start) * dim + self.embedding_dim * dim
                   for (start, end), dim in zip(self.band_edges, self.band_dims))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        device = self.projs[0].weight.device
        check_ids(ids, self.num_embeddings, device)
        flat = ids.reshape(-1).long()
        out = self.projs[0].weight.new_zeros(flat.shape[0], self.embedding_dim)
        for (start, end), band, proj in zip(self.band_edges, self.bands, self.projs):
            # Also run empty bands: every parameter then gets a (zero) gradient, which
            # DistributedDataParallel needs from each step.
            rows = ((flat >= start) & (flat < end)).nonzero().squeeze(1)
            out = out.index_copy(0, rows, proj(band(flat[rows] - start)))
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, cutoffs={list(self.cutoffs)}, "
                f"factor={self.factor}, band_dims={list(self.band_dims)}")


class AdaptiveDeFINE(nn.Module):
    """DeFINE with an adaptive-input Map: ids -> AdaptiveInput(V, map_dim) * scale -> HGT -> [*, m].

    The HGT stack is `define_kernels.HGT(HGTConfig(map_dim, expand_dim, embedding_dim, depth,
    max_groups, **hgt_options), backend)`; `scale` defaults to sqrt(map_dim) like DeFINE's
    scale_map (the adaptive bands are initialised N(0, d_i^-1/2) too). The same recipe plugs any
    n-wide map into define_kernels.HGT.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, cutoffs: Sequence[int] = (),
                 factor: float = 4, map_dim: int = 128, expand_dim: int = 1024, depth: int = 4,
                 max_groups: int = 8, scale_map: bool = True, backend: str = "auto", **hgt_options):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.map_dim = num_embeddings, embedding_dim, map_dim
        self.map = AdaptiveInput(num_embeddings, map_dim, cutoffs, factor)
        self.config = HGTConfig(map_dim, expand_dim, embedding_dim, depth, max_groups, **hgt_options)
        self.hgt = HGT(self.config, backend)
        self.scale = math.sqrt(map_dim) if scale_map else 1.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hgt(self.map(ids) * self.scale)

    def parameter_counts(self) -> dict:
        mapped = sum(p.numel() for p in self.map.parameters())
        transform = sum(p.numel() for p in self.hgt.parameters())
        return {"map": mapped, "transform": transform, "total": mapped + transform}
