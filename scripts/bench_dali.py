"""Two-view loader throughput (images/s; each image gives both views), data only, no model.

    python scripts/bench_dali.py                        # DALI, mixed (GPU) decode, batch 256, 224 px
    python scripts/bench_dali.py --backends dali,torch --workers 16
    python scripts/bench_dali.py --backends dali-cpu,torch --batch-size 32 --workers 2 --images 200

Backends are timed in interleaved rounds on the same machine (shared machines are noisy: compare the
ratios of one run). Per round and backend: a fresh iterator, ``--warmup`` steps (pipeline start,
prefetch fill), then ``--steps`` timed steps ending with ``torch.cuda.synchronize()`` on a GPU; the
time to the first batch is reported separately (the DALI backend builds a pipeline per epoch). An
epoch that ends inside the timed steps is followed by the next one, as in training.

Data: ``--source`` (any source ``pipelines.build_loader`` reads), or the sample data
(``pipelines.sample_data``: ~500 x 375 JPEGs cut from scikit-image's photographs) written once to
``--data`` with ``--images`` images and listed ``--repeat`` times in a ``.txt`` list, so an epoch is
long enough without writing thousands of files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import build_loader  # noqa: E402
from pipelines.sample_data import make_sample_data  # noqa: E402
from pipelines.sources import list_images  # noqa: E402


def sample_list(data: str, images: int, repeat: int) -> str:
    """Write (or reuse) the sample data and a .txt list naming each image ``repeat`` times."""
    root = make_sample_data(os.path.join(data, f"sample-{images}"), num_images=images)
    listing = list_images(root)
    path = os.path.join(data, f"sample-{images}-x{repeat}.txt")
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(repeat):
            handle.writelines(f"{p} {label}\n" for p, label in zip(listing.paths, listing.labels))
    return path


def endless(loader):
    """Batches of consecutive epochs, as the training loop sees them."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_round(loader, warmup: int, steps: int, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = endless(loader)
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(batches)
    sync()
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(batches)
        images += len(batch)
    sync()
    elapsed = time.perf_counter() - start
    batches.close()  # frees the DALI pipeline before the next backend runs
    return {"img_per_s": images / elapsed, "step_ms": 1000 * elapsed / steps, "first_batch_s": first}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="dali", help="comma-separated: dali, dali-cpu, torch, ffcv")
    parser.add_argument("--source", default=None, help="data source (default: the sample data)")
    parser.add_argument("--data", default="/tmp/maskco-bench", help="where the sample data is written")
    parser.add_argument("--images", type=int, default=512, help="sample images written")
    parser.add_argument("--repeat", type=int, default=32, help="times each sample image is listed")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=None, help="decode threads / processes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hw-decoder-load", type=float, default=None, help="DALI: share sent to the HW JPEG decoder")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    source = args.source or sample_list(args.data, args.images, args.repeat)
    loaders = {}
    for backend in args.backends.split(","):
        options = {"hw_decoder_load": args.hw_decoder_load} if backend == "dali" and args.hw_decoder_load else {}
        loaders[backend] = build_loader(backend, source, batch_size=args.batch_size, image_size=args.image_size,
                                        device=device, workers=args.workers, **options)
    results = {backend: [] for backend in loaders}
    for round_index in range(args.rounds):
        for backend, loader in loaders.items():
            result = run_round(loader, args.warmup, args.steps, device)
            results[backend].append(result)
            print(json.dumps({"round": round_index, "backend": backend, "device": card, **result}), flush=True)
    base = max(r["img_per_s"] for r in next(iter(results.values())))
    for backend, rounds in results.items():
        best = max(r["img_per_s"] for r in rounds)
        print(f"{backend:9s} {best:9.1f} img/s (best of {len(rounds)})  x{best / base:.2f} of "
              f"{next(iter(results))}  batch {args.batch_size}, {args.image_size} px, {card}")


if __name__ == "__main__":
    main()
