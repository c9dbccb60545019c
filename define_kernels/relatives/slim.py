"""Slim embeddings (Li et al., AAAI 2018; docs/math.md §4): words share randomly assigned sub-vectors.

Word w's vector is the concatenation of K sub-vectors of width d/K; slot s takes row idx[w, s]
of slot s's own pool of M/K rows. `idx` is drawn uniformly once from `seed` and never trained,
so the table costs M*d/K parameters instead of V*d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_positive_int
from ._checks import check_hidden, check_ids


def _slim_shapes(num_embeddings, dim, num_subvectors, pool_size, dim_name):
    check_positive_int("num_embeddings", num_embeddings)
    check_positive_int(dim_name, dim)
    check_positive_int("num_subvectors", num_subvectors)
    check_positive_int("pool_size", pool_size)
    if dim % num_subvectors:
        raise ValueError(f"{dim_name} ({dim}) must be divisible by num_subvectors ({num_subvectors})")
    if pool_size % num_subvectors:
        raise ValueError(f"pool_size ({pool_size}) must be divisible by num_subvectors ({num_subvectors})")


def draw_assignment(num_embeddings: int, num_subvectors: int, rows_per_pool: int, seed: int) -> torch.Tensor:
    """idx [V, K] int64, uniform over each slot's pool, from a private generator (seeded)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, rows_per_pool, (num_embeddings, num_subvectors), generator=generator)


class _SlimTable(nn.Module):
    """pools [K, M/K, d/K] (trained) + idx [V, K] (a buffer, fixed)."""

    def __init__(self, num_embeddings, dim, num_subvectors, pool_size, seed, dim_name):
        super().__init__()
        _slim_shapes(num_embeddings, dim, num_subvectors, pool_size, dim_name)
        self.num_embeddings, self.num_subvectors, self.pool_size = num_embeddings, num_subvectors, pool_size
        self.seed = int(seed)
        k = num_subvectors
        self.pools = nn.Parameter(torch.empty(k, pool_size // k, dim // k))
        self.register_buffer("idx", draw_assignment(num_embeddings, k, pool_size // k, self.seed))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pools)  # N(0, 1) like nn.Embedding, so each word vector is too

    def materialize(self) -> torch.Tensor:
        """The full [V, d] table the pools stand for (tests and small vocabularies only)."""
        slots = torch.arange(self.num_subvectors, device=self.idx.device)
        return self.pools[slots, self.idx].reshape(self.num_embeddings, -1)


class SlimEmbedding(_SlimTable):
    """ids [*] (int32/int64) -> [*, embedding_dim] from K shared sub-vector pools.

    Parameters: pools [K, M/K, d/K] (M*d/K numbers). Buffer: idx [V, K].
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, num_subvectors: int = 4,
                 pool_size: int = 1024, seed: int = 0):
        super().__init__(num_embeddings, embedding_dim, num_subvectors, pool_size, seed, "embedding_dim")
        self.embedding_dim = embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids(ids, self.num_embeddings, self.pools.device)
        slots = torch.arange(self.num_subvectors, device=ids.device)
        rows = self.pools[slots, self.idx[ids.long()]]  # [*, K, d/K]
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, num_subvectors={self.num_subvectors}, "
                f"pool_size={self.pool_size}, seed={self.seed}")


class SlimOutput(nn.Module):
    """h [*, H] -> logits [*, V] over a slim output table, never materializing [V, H].

    logits[w] = sum_s <h_s, P_s[idx[w, s]]> (+ bias[w]), h_s the s-th of K chunks of h: first
    every chunk against its whole pool (M/K rows of H/K: O(M*H/K) per token), then a gather of K
    scores per word (O(V*K)). With `shared=` a SlimEmbedding of width H, its pools and idx are
    reused (tying); otherwise the output has its own pools, drawn from `seed`.
    """

    def __init__(self, num_embeddings: int, hidden_dim: int, *, num_subvectors: int = 4,
                 pool_size: int = 1024, seed: int = 0, bias: bool = True, shared: "SlimEmbedding" = None):
        super().__init__()
        if shared is not None:
            if not isinstance(shared, SlimEmbedding):
                raise ValueError(f"shared must be a SlimEmbedding, got {type(shared).__name__}")
            if (shared.num_embeddings, shared.embedding_dim) != (num_embeddings, hidden_dim):
                raise ValueError(f"shared has shape [{shared.num_embeddings}, {shared.embedding_dim}] "
                                 f"but the output needs [{num_embeddings}, {hidden_dim}]")
            self.table = shared
        else:
            self.table = _SlimTable(num_embeddings, hidden_dim, num_subvectors, pool_size, seed, "hidden_dim")
        self.num_embeddings, self.hidden_dim = num_embeddings, hidden_dim
        self.bias = nn.Parameter(torch.zeros(num_embeddings)) if bias else None

    def materialize(self) -> torch.Tensor:
        return self.table.materialize()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pools, idx = self.table.pools, self.table.idx
        check_hidden(h, self.hidden_dim, pools.dtype)
        k = pools.shape[0]
        rows = h.reshape(-1, k, self.hidden_dim // k)
        scores = torch.einsum("tkc,kmc->ktm", rows, pools)  # [K, T, M/K]
        logits = scores[0].index_select(1, idx[:, 0])
        for slot in range(1, k):
            logits = logits + scores[slot].index_select(1, idx[:, slot])
        if self.bias is not None:
            logits = logits + self.bias
        return logits.reshape(*h.shape[:-1], self.num_embeddings)

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds of the pool products plus the K-way gather-sum (docs/math.md §4)."""
        return self.table.pool_size * self.hidden_dim // self.table.num_subvectors \
            + self.num_embeddings * self.table.num_subvectors

    def extra_repr(self) -> str:
        return (f"{self.hidden_dim} -> {self.num_embeddings}, num_subvectors={self.table.num_subvectors}, "
                f"pool_size={self.table.pool_size}, bias={self.bias is not None}")
