"""The standard workloads of docs/math.md §5, by name; benchmarks and tests read them from here."""
from __future__ import annotations

from typing import NamedTuple

from .config import HGTConfig


class Workload(NamedTuple):
    name: str
    vocab_size: int
    map_dim: int
    expand_dim: int
    embedding_dim: int
    depth: int
    max_groups: int
    tokens_per_batch: int

    def config(self, **options) -> HGTConfig:
        """docs/math.md §5: group_rule halve, align 8, transform define, LayerNorm + GELU, no in-proj."""
        return HGTConfig(self.map_dim, self.expand_dim, self.embedding_dim, self.depth,
                         self.max_groups, **options)

    def define_kwargs(self) -> dict:
        """Keyword arguments of define_kernels.DeFINE for this workload."""
        return dict(num_embeddings=self.vocab_size, embedding_dim=self.embedding_dim,
                    map_dim=self.map_dim, expand_dim=self.expand_dim, depth=self.depth,
                    max_groups=self.max_groups)


WORKLOADS = {w.name: w for w in (
    Workload("ptb-lstm", 10_000, 128, 1024, 400, 3, 4, 20 * 35),
    Workload("wt2-small", 33_278, 128, 1024, 512, 4, 8, 32 * 128),
    Workload("wt103-base", 267_735, 128, 1024, 512, 4, 8, 16_384),
    Workload("wt103-wide", 267_735, 256, 1024, 1024, 4, 8, 16_384),
    Workload("wt103-deep", 267_735, 128, 4096, 384, 3, 4, 16_384),
)}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {name!r}")
    return WORKLOADS[name]
