"""Micro-benchmarks of the fused RoI pool (vs torchvision) and the contrastive loss, forward + backward.

    python -m maskco.microbench [--device cpu|cuda] [--repeats R]

Shapes are the paper's per-GPU ones: 32 images, 1 + 16 key boxes each, a 7 x 7 x 2048 C5 map
(224-pixel views, stride 32), aligned RoI-align; loss with N = 32, M = 16, C = 128. A fused case and
its reference are timed in alternation within one run, so their ratio survives a noisy shared
machine even when the absolute numbers do not. ``run()`` returns the rows for ``maskco/bench.py``.
"""
import argparse
import statistics
import time

import torch

from maskco.bench_timing import sync
from maskco.loss import contrastive_loss
from maskco.roi import roi_pool, roi_pool_reference

IMAGES, BOXES, CHANNELS, MAP, STRIDE = 32, 17, 2048, 7, 32
LOSS_DIM, TEMPERATURE = 128, 0.2


def _random_boxes(device, generator):
    """[IMAGES, BOXES, 4] xyxy boxes inside the 224-pixel view, 16 to 128 pixels a side."""
    size = MAP * STRIDE
    side = 16 + torch.rand(IMAGES, BOXES, 2, generator=generator) * 112  # [N, L, 2]
    corner = torch.rand(IMAGES, BOXES, 2, generator=generator) * (size - side)  # [N, L, 2]
    return torch.cat([corner, corner + side], dim=-1).to(device)  # [N, L, 4]


def _roi_cases(device, generator):
    """(group, impl, step) triples; each step runs forward and backward once."""
    features = torch.randn(IMAGES, CHANNELS, MAP, MAP, generator=generator).to(device)
    features = features.to(memory_format=torch.channels_last).requires_grad_()  # the trainer's layout
    boxes = _random_boxes(device, generator)
    grad = torch.randn(IMAGES, BOXES, CHANNELS, generator=generator).to(device)  # [N, L, C]
    cases = []
    for sampling_ratio in (2, -1):
        for impl, pool in (("fused", roi_pool), ("reference", roi_pool_reference)):
            def step(pool=pool, sampling_ratio=sampling_ratio):
                features.grad = None
                pooled = pool(features, boxes, 1 / STRIDE, sampling_ratio, aligned=True, validate_boxes=False)
                pooled.backward(grad)
            cases.append((f"roi_pool sampling_ratio={sampling_ratio}", impl, step))
    return cases


def _loss_cases(device, generator):
    q = torch.nn.functional.normalize(torch.randn(IMAGES, LOSS_DIM, generator=generator), dim=1)
    k = torch.nn.functional.normalize(torch.randn(IMAGES, BOXES, LOSS_DIM, generator=generator), dim=2)
    q, k = q.to(device).requires_grad_(), k.to(device)
    valid = torch.ones(IMAGES, dtype=torch.bool, device=device)
    cases = []
    for intra in (False, True):
        def step(intra=intra):
            q.grad = None
            contrastive_loss(q, k, valid, TEMPERATURE, intra=intra).backward()
        cases.append((f"contrastive_loss N={IMAGES} M={BOXES - 1} C={LOSS_DIM} intra={intra}", "fused", step))
    return cases


def _time(step, device):
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)  # wait for exactly the queued work of this step
    return (time.perf_counter() - start) * 1e3


def run(device="cpu", repeats=None):
    """Time every case ``repeats`` times (default 5 on CPU, 50 on CUDA) after a warm-up, cases of a
    group interleaved. Returns one dict per case: group, impl, device, threads, repeats, median_ms,
    min_ms, max_ms, and for fused cases with a reference speedup = reference median / fused median."""
    device = torch.device(device)
    repeats = repeats or (50 if device.type == "cuda" else 5)
    generator = torch.Generator().manual_seed(0)
    cases = _roi_cases(device, generator) + _loss_cases(device, generator)
    for _, _, step in cases:  # warm-up: kernel selection, allocator, lazy init
        for _ in range(1 if device.type == "cpu" else 3):
            step()
    times = [[] for _ in cases]
    for _ in range(repeats):
        for slot, (_, _, step) in enumerate(cases):
            times[slot].append(_time(step, device))
    rows = []
    for (group, impl, _), measured in zip(cases, times):
        rows.append({"group": group, "impl": impl, "device": str(device), "threads": torch.get_num_threads(),
                     "repeats": repeats, "median_ms": statistics.median(measured),
                     "min_ms": min(measured), "max_ms": max(measured)})
    medians = {(row["group"], row["impl"]): row["median_ms"] for row in rows}
    for row in rows:
        if row["impl"] == "fused" and (row["group"], "reference") in medians:
            row["speedup"] = medians[(row["group"], "reference")] / row["median_ms"]
    return rows


def format_table(rows):
    lines = [f"{'case':<52} {'impl':<10} {'median ms':>10} {'min':>9} {'max':>9} {'speedup':>8}"]
    for row in rows:
        speedup = f"{row['speedup']:.1f}x" if "speedup" in row else ""
        lines.append(f"{row['group']:<52} {row['impl']:<10} {row['median_ms']:>10.2f} "
                     f"{row['min_ms']:>9.2f} {row['max_ms']:>9.2f} {speedup:>8}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5 on CPU, 50 on CUDA)")
    args = parser.parse_args(argv)
    rows = run(args.device, args.repeats)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} (forward + backward)")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
