"""How the bench times things, for every figure and every micro-benchmark: warm-up calls, the device
synchronised around each timed call, repeats, median and spread (machines are shared and noisy, so
every figure is a distribution)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_seconds(fns: Sequence[Callable[[], object]], device: torch.device, repeats: int,
                 warmup: int = 1) -> list[list[float]]:
    """Seconds of each timed call of each function: ``warmup`` untimed calls of each, then ``repeats``
    rounds that call every function once in turn. Interleaving keeps the ratio of two functions
    (fused / reference) meaningful when the machine's speed drifts during the run."""
    for fn in fns:
        for _ in range(warmup):  # kernel selection, allocator, lazy init, loader workers
            fn()
    seconds = [[] for _ in fns]
    for _ in range(repeats):
        for slot, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)  # wait for exactly the queued work of this call
            seconds[slot].append(time.perf_counter() - start)
    return seconds


def spread(values: Sequence[float], key: str) -> dict:
    """``{key: median, "min": ..., "max": ..., "repeats": n}``."""
    return {key: statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}


def timed(fn, items_per_call: int, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Images per second of ``fn`` (which handles ``items_per_call`` images per call): median and spread."""
    (seconds,) = call_seconds([fn], device, repeats, warmup)
    return spread([items_per_call / s for s in seconds], "img_per_s")


def loader_rate(loader, batches: int, batch_size: int, device, consume, repeats: int = 3,
                warmup_batches: int = 1) -> dict:
    """Images per second of ``batches`` batches of ``loader``, each given to ``consume``, ``repeats`` times,
    after ``warmup_batches`` untimed ones (workers started, pipeline built, what the workers had prefetched
    drained), all from one iterator: a new iterator restarts the DataLoader's workers or rebuilds DALI's
    pipeline (0.5-1.5 s), which is not what is measured. So the batches per repeat are cut to what one epoch
    holds; the row says how many were timed (``batches``)."""
    per_repeat = fitting_batches(loader, batches, repeats, warmup_batches)
    iterator = iter(loader)
    for _ in range(warmup_batches):
        consume(next(iterator))
    result = timed(lambda: [consume(next(iterator)) for _ in range(per_repeat)], per_repeat * batch_size, device,
                   repeats, warmup=0)
    return {**result, "batches": per_repeat}


def fitting_batches(loader, batches: int, repeats: int, warmup_batches: int = 1) -> int:
    """``batches``, or fewer, so that the warm-up and ``repeats`` rounds come from one epoch of ``loader``."""
    per_repeat = min(batches, (len(loader) - warmup_batches) // repeats)
    if per_repeat < 1:
        raise ValueError(f"an epoch of {len(loader)} batches cannot hold {warmup_batches} warm-up batches and "
                         f"{repeats} repeats: use more images (--images) or a smaller batch")
    return per_repeat
