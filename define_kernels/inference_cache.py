"""A materialized V x m output table for a context-free embedding in eval mode (docs/math.md §3)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def parameters_fingerprint(params: Sequence[torch.Tensor]) -> tuple:
    """Changes whenever any parameter is written in place, replaced, moved or cast."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


class InferenceCache:
    """Holds `table[id] = embed(id)` for every id, rebuilt when the parameters change.

    `embed` maps 1-D ids to [len(ids), m]; the table is filled `chunk_size` ids at a time so the
    intermediates of the stack never exceed one chunk.
    """

    def __init__(self, chunk_size: int = 4096):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.table: Optional[torch.Tensor] = None
        self._fingerprint: Optional[tuple] = None
        self.builds = 0  # how often the table was (re)built; tests and benchmarks read it

    def clear(self) -> None:
        self.table, self._fingerprint = None, None

    def get(self, params: Sequence[torch.Tensor], num_embeddings: int,
            embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        fingerprint = parameters_fingerprint(params)
        if self.table is None or fingerprint != self._fingerprint:
            self.clear()  # free the stale table before building the new one
            self.table = self._build(num_embeddings, embed, params[0].device)
            self._fingerprint = fingerprint
            self.builds += 1
        return self.table

    @torch.no_grad()
    def _build(self, num_embeddings, embed, device) -> torch.Tensor:
        table = None
        for start in range(0, num_embeddings, self.chunk_size):
            ids = torch.arange(start, min(start + self.chunk_size, num_embeddings), device=device)
            rows = embed(ids)
            if table is None:  # written in place: peak memory is the table plus one chunk
                table = rows.new_empty(num_embeddings, rows.shape[1])
            table[start:start + rows.shape[0]] = rows
        return table
