"""Schedules are pure functions of the step: resume and tests need no scheduler object."""
from __future__ import annotations

import math


def cosine(step: int, total: int, start: float, end: float, warmup: int = 0) -> float:
    """Linear warm-up from 0 to ``start`` over ``warmup`` steps, then cosine from ``start`` to ``end``.

    step: steps done so far (0-based); total: steps in the whole run.
    """
    if step < warmup:
        return start * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, total: int, base: float, schedule: str) -> float:
    """Key-encoder momentum: constant, or cosine from ``base`` to 1 (BYOL's schedule)."""
    if schedule == "constant":
        return base
    return cosine(step, total, base, 1.0)
