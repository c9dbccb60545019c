"""Totals of the fuzz suites, printed by conftest's terminal summary hook."""
from __future__ import annotations

import contextlib

_examples = 0
_backends: set = set()
_comparisons = 0
_mismatches = 0
_bad_inputs = [0, 0]  # cases, wrong outcomes


def example() -> None:
    global _examples
    _examples += 1


@contextlib.contextmanager
def comparing(backend: str):
    """Counts one comparison of `backend` against the reference; a failure counts a mismatch."""
    global _comparisons, _mismatches
    _backends.add(backend)
    _comparisons += 1
    try:
        yield
    except AssertionError:
        _mismatches += 1
        raise


def bad_inputs(cases: int, wrong: int) -> None:
    _bad_inputs[0] += cases
    _bad_inputs[1] += wrong


def summary_line() -> str:
    lines = []
    if _bad_inputs[0]:
        lines.append(f"{_bad_inputs[0]} bad-input cases in subprocesses, {_bad_inputs[1]} wrong outcomes")
    if not _examples:
        return "\n".join(lines)
    return "\n".join([(f"{_examples} examples, {len(_backends)} backends, {_mismatches} mismatches "
            f"({_comparisons} backend-vs-reference comparisons: {', '.join(sorted(_backends))})")] + lines)
