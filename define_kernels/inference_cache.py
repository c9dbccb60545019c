"""A lazily filled V x m output table for a context-free embedding served without gradients
(docs/math.md §3).

The output of DeFINE depends only on the id, so in eval mode `table[id] = embed(id)` can be
served by one gather. The table is filled per id on first request (the first call after a weight
change costs the distinct ids it sees, not V), fully only on `materialize()` or once most of V
has been requested. A change of any parameter (in-place write, optimizer step, load_state_dict,
replacement, move, cast) is caught by a fingerprint of the parameters and drops the table; the
module also clears it in `_apply` (every move and cast).

Thread safety: the bookkeeping and filling happen under a lock; the gather runs outside it on one
generation (`_Filled`) whose filled rows never change again. An invalidation starts a new
generation instead of clearing the old one in place, so a concurrent reader of the old one is safe.
"""
from __future__ import annotations

import operator
import threading
from typing import Callable, Optional, Sequence

import torch

from .checks import check_ids_in_range


def parameters_fingerprint(params: Sequence[torch.Tensor]) -> tuple:
    """Storage and version of each parameter: changes on an in-place write (optimizer step,
    load_state_dict) and on new storage (`.data =`, moves, casts)."""
    return tuple((p.data_ptr(), p._version) for p in params)


class _Fingerprint:
    """The parameters a generation was computed from: the objects themselves (held, so a replaced
    parameter's id cannot be reused by a new one) and their storage/version stamps."""

    __slots__ = ("params", "stamps")

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = tuple(params)
        self.stamps = parameters_fingerprint(self.params)

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        return (len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                and parameters_fingerprint(params) == self.stamps)


class _Filled:
    """One generation of the table: rows, which rows are valid, and the parameters it belongs to."""

    __slots__ = ("table", "filled", "count", "fingerprint", "complete")

    def __init__(self, fingerprint: _Fingerprint):
        self.fingerprint = fingerprint
        self.table: Optional[torch.Tensor] = None
        self.filled: Optional[torch.Tensor] = None  # bool [V]
        self.count = 0
        self.complete = False


class InferenceCache:
    """Serves `embed(ids)` from a lazily filled table.

    `embed` maps 1-D ids to [len(ids), m] (called under no_grad, `chunk_size` ids at a time, so
    the stack's intermediates never exceed one chunk). `full_fill_fraction`: once this share of
    V is filled, the rest is filled too and later calls skip the per-id bookkeeping.
    """

    def __init__(self, chunk_size: int = 4096, full_fill_fraction: float = 0.5):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not 0.0 < full_fill_fraction <= 1.0:
            raise ValueError(f"full_fill_fraction must be in (0, 1], got {full_fill_fraction!r}")
        self.chunk_size, self.full_fill_fraction = chunk_size, full_fill_fraction
        self._state: Optional[_Filled] = None
        self._lock = threading.Lock()
        # Counters read by tests and benchmarks: generations started (one per parameter change
        # seen), fill calls, rows computed by the stack.
        self.builds = 0
        self.fills = 0
        self.rows_computed = 0

    @property
    def table(self) -> Optional[torch.Tensor]:
        state = self._state
        return None if state is None else state.table

    @property
    def filled_rows(self) -> int:
        state = self._state
        return 0 if state is None else state.count

    def __getstate__(self) -> dict:
        # Copies and pickles (deepcopy of a model, torch.save of a module) start with an empty
        # table: it is derived from the parameters, and a lock cannot be pickled.
        state = dict(self.__dict__)
        state["_state"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._state = None

    # ------------------------------------------------------------------------------ serving
    def lookup(self, ids: torch.Tensor, params: Sequence[torch.Tensor], num_embeddings: int,
               embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """table[ids] for non-empty 1-D ids, filling whatever rows are missing first."""
        state = self._state
        if state is None or not state.complete or not state.fingerprint.matches(params):
            with self._lock:
                state = self._current(params)
                if not state.complete and not _all_filled(state.filled, ids, num_embeddings):
                    self._fill(state, ids, num_embeddings, embed)
        # Outside the lock: the rows of a generation never change once marked filled.
        return _gather(state.table, ids, num_embeddings)

    def materialize(self, params: Sequence[torch.Tensor], num_embeddings: int,
                    embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Fill every row now (e.g. before serving); returns the [V, m] table."""
        with self._lock:
            state = self._current(params)
            if not state.complete:
                self._fill(state, None, num_embeddings, embed)
            return state.table

    # ------------------------------------------------------------------------------ filling
    def _current(self, params: Sequence[torch.Tensor]) -> _Filled:
        """The generation for these parameters (caller holds the lock)."""
        state = self._state
        if state is None or not state.fingerprint.matches(params):
            # A new generation; the stale table is freed once no reader holds it.
            state = self._state = _Filled(_Fingerprint(params))
            self.builds += 1
        return state

    def _fill(self, state: _Filled, ids: Optional[torch.Tensor], num_embeddings: int, embed) -> None:
        """Compute the missing rows of `ids` (all rows when None); caller holds the lock."""
        # inference_mode(False): rows written now must stay writable by later fills made outside
        # inference mode (in-place writes to inference tensors are forbidden there).
        with torch.inference_mode(False), torch.no_grad():
            if state.filled is None:
                device = ids.device if ids is not None else None
                state.filled = torch.zeros(num_embeddings, dtype=torch.bool, device=device)
            if ids is None:
                missing = torch.nonzero(~state.filled).reshape(-1)
            else:
                unique = torch.unique(ids.long())
                missing = unique[~state.filled[unique]]
                if state.count + missing.numel() >= self.full_fill_fraction * num_embeddings:
                    missing = torch.nonzero(~state.filled).reshape(-1)  # most of V: finish it
            for start in range(0, missing.numel(), self.chunk_size):
                chunk = missing[start:start + self.chunk_size]
                rows = embed(chunk)
                if state.table is None:
                    state.table = rows.new_empty(num_embeddings, rows.shape[1])
                state.table[chunk] = rows
                state.filled[chunk] = True
            state.count += missing.numel()
            state.complete = state.count == num_embeddings
            self.fills += 1
            self.rows_computed += missing.numel()


def _all_filled(filled: Optional[torch.Tensor], ids: torch.Tensor, num_embeddings: int) -> bool:
    """Whether every id's row is filled; raises IndexError naming a bad id (the check is fused
    with the lookup of the filled flags, as in `_gather`)."""
    if filled is None:
        check_ids_in_range(ids, num_embeddings)
        return False
    return bool(_gather(filled, ids, num_embeddings).all())


def _gather(table: torch.Tensor, ids: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """One fused range check + gather: index_select raises on a bad id; then name the value."""
    try:
        return table.index_select(0, ids)
    except (IndexError, RuntimeError):
        check_ids_in_range(ids, num_embeddings)
        raise
