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


def step_decay(step: int, total: int, peak: float, warmup: int, milestones: tuple[float, ...],
               warmup_factor: float = 1e-3) -> float:
    """detectron2's WarmupMultiStepLR as a function: linear warm-up from ``peak * warmup_factor`` over
    ``warmup`` steps, then ``peak`` divided by 10 at each milestone (a fraction of ``total``: VOC's 18k and
    22k of 24k are 3/4 and 11/12).

    step: steps done so far (0-based); total: steps in the whole run.
    """
    drops = sum(step >= round(fraction * total) for fraction in milestones)
    factor = 1.0
    if step < warmup:
        alpha = step / warmup
        factor = warmup_factor * (1 - alpha) + alpha
    return peak * factor * 0.1 ** drops
