"""Micro-benchmarks of the fused RoI pool (vs torchvision) and the contrastive loss, forward + backward.

    python -m maskco.bench.micro [--device cpu|cuda] [--repeats R]

Shapes are the paper's per-GPU ones: 32 images, 1 + 16 key boxes each, a 7 x 7 x 2048 C5 map
(224-pixel views, stride 32), aligned RoI-align; loss with N = 32, M = 16, C = 128. A fused case and
its reference are timed in alternation within one run, so their ratio survives a noisy shared
machine even when the absolute numbers do not (``timing.call_seconds``). ``run()`` returns the rows
for ``python -m maskco.bench``: latencies in milliseconds per call, never a rate.
"""
import argparse

import torch

from maskco.bench.timing import call_seconds, spread
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


def run(device="cpu", repeats=None):
    """Time every case ``repeats`` times (default 5 on CPU, 50 on CUDA) after a warm-up, all cases
    interleaved. Returns one dict per case: group, impl, device, threads, and the latency in ms per
    call (``ms_per_call`` median, ``min``, ``max``, ``repeats``); fused cases with a reference also get
    ``speedup`` = reference median / fused median."""
    device = torch.device(device)
    repeats = repeats or (50 if device.type == "cuda" else 5)
    generator = torch.Generator().manual_seed(0)
    cases = _roi_cases(device, generator) + _loss_cases(device, generator)
    seconds = call_seconds([step for _, _, step in cases], device, repeats, warmup=1 if device.type == "cpu" else 3)
    rows = [{"group": group, "impl": impl, "device": str(device), "threads": torch.get_num_threads(),
             **spread([1e3 * s for s in measured], "ms_per_call"), "unit": "ms per call"}
            for (group, impl, _), measured in zip(cases, seconds)]
    medians = {(row["group"], row["impl"]): row["ms_per_call"] for row in rows}
    for row in rows:
        if row["impl"] == "fused" and (row["group"], "reference") in medians:
            row["speedup"] = medians[(row["group"], "reference")] / row["ms_per_call"]
    return rows


def format_table(rows):
    lines = [f"{'case':<52} {'impl':<10} {'median ms':>10} {'min':>9} {'max':>9} {'speedup':>8}"]
    for row in rows:
        speedup = f"{row['speedup']:.1f}x" if "speedup" in row else ""
        lines.append(f"{row['group']:<52} {row['impl']:<10} {row['ms_per_call']:>10.2f} "
                     f"{row['min']:>9.2f} {row['max']:>9.2f} {speedup:>8}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m maskco.bench.micro", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5 on CPU, 50 on CUDA)")
    args = parser.parse_args(argv)
    rows = run(args.device, args.repeats)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} (forward + backward)")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
