"""How the bench times things: warm-up, the device synchronised around the timed region, repeats,
median and spread (machines are shared and noisy, so every figure is a distribution)."""
from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, items_per_call: int, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Run ``fn`` warmup + repeats times; img/s of each timed call -> median and spread."""
    for _ in range(warmup):
        fn()
    sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        rates.append(items_per_call / (time.perf_counter() - start))
    return {"img_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats}


def loader_rate(loader, batches: int, batch_size: int, device, consume, repeats: int = 3) -> dict:
    """img/s of ``batches`` batches of ``loader`` (after one warm-up batch), ``repeats`` times."""
    rates, epoch = [], 0
    iterator = iter(loader)
    consume(next(iterator))  # warm-up: workers started, first batch
    for _ in range(repeats):
        sync(device)
        start, seen = time.perf_counter(), 0
        for _ in range(batches):
            try:
                item = next(iterator)
            except StopIteration:
                epoch += 1
                if hasattr(loader, "set_epoch"):  # the baseline's DataLoader has none
                    loader.set_epoch(epoch)
                iterator = iter(loader)
                item = next(iterator)
            consume(item)
            seen += batch_size
        sync(device)
        rates.append(seen / (time.perf_counter() - start))
    return {"img_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats}
