"""Learning-rate schedules of the LM trainer, as pure functions of the step (so a resumed run
continues on the same curve).

    plateau  the LSTM recipe: the rate is multiplied by --lr-decay after a worse validation
             (handled by the trainer; constant between evaluations)
    cosine   linear warm-up over `warmup` steps, then a half cosine from `lr` down to
             `min_ratio * lr` at `total` steps
"""
from __future__ import annotations

import math

SCHEDULES = ("plateau", "cosine")


def cosine_lr(step: int, total: int, lr: float, warmup: int = 0, min_ratio: float = 0.1) -> float:
    """The rate for the update that follows `step` completed updates (0-based)."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    done = min(max(step - warmup, 0) / span, 1.0)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * done)))
