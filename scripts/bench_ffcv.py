"""FFCV backend throughput against the torch backend and against decode-only, in one run.

    python scripts/bench_ffcv.py [--images 256] [--threads 2] [--batch-size 32] [--image-size 224]
        [--rounds 3] [--device cpu] [--work-dir DIR]

Writes (or reuses) the sample ImageFolder (``pipelines.sample_data``, ~500 x 375 JPEGs of quality 90)
and its ``.beton`` in ``--work-dir``, then measures, interleaved over ``--rounds`` rounds (these
machines are shared and noisy; the medians are reported):
- ffcv:  the ffcv backend, images/s delivered as Batch (two uint8 views + windows), ``--threads``
         decode threads, after one warm-up epoch (numba compile); its default interpolation "auto",
         and "linear" / "area" (FFCV's own INTER_AREA) for comparison;
- torch: the torch backend, ``--threads`` DataLoader workers, after one warm-up epoch;
- decode-only ceilings on ``--threads`` threads: PIL (libjpeg-turbo) decoding the original files
  from memory, and FFCV's libjpeg-turbo ``imdecode`` decoding the JPEGs stored in the .beton.
Prints a markdown table and one JSON line. Not a test: no thresholds.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from pipelines import build_loader  # noqa: E402
from pipelines.ffcv_writer import check_beton, write_beton  # noqa: E402
from pipelines.sample_data import make_sample_data  # noqa: E402
from pipelines.sources import list_images  # noqa: E402


def loader_rate(loader, epochs: int, device: torch.device) -> float:
    """Images/s over ``epochs`` passes of ``loader`` (the caller warms it up first)."""
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            count += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def pil_decode_rate(blobs: list[bytes], threads: int) -> float:
    def decode(blob: bytes) -> None:
        with Image.open(io.BytesIO(blob)) as image:
            image.convert("RGB")  # decodes (PIL releases the GIL while it does)

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(decode, blobs))
        return len(blobs) / (time.perf_counter() - start)


def turbo_decode_rate(beton: str, threads: int) -> float:
    """FFCV's own decode (libjpeg-turbo, fast IDCT; ctypes releases the GIL) of the stored JPEGs."""
    from ffcv.libffcv import imdecode

    info = check_beton(beton)
    data = np.fromfile(beton, dtype=np.uint8)
    jobs = [(np.ascontiguousarray(data[int(m["data_ptr"]): int(m["data_ptr"]) + int(size)]),
             int(m["height"]), int(m["width"])) for m, size in zip(info.images, info.sizes) if m["mode"] == 0]

    def decode(job) -> None:
        blob, height, width = job
        imdecode(blob, np.empty((height, width, 3), dtype=np.uint8), height, width, height, width,
                 0, 0, 1, 1, False, False)

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(decode, jobs))
        return len(jobs) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="decode threads / workers of every method")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="timed passes per loader and round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "maskco_bench_ffcv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    # ---- data: the same images for every method
    root = make_sample_data(os.path.join(args.work_dir, "images"), num_images=args.images, seed=0)
    beton = os.path.join(args.work_dir, f"images_{args.images}.beton")
    if not os.path.exists(beton) or os.path.getmtime(beton) < os.path.getmtime(root):
        write_beton(root, beton, workers=args.threads, progress=False)
    paths = list_images(root).paths
    blobs = [open(path, "rb").read() for path in paths]

    # ---- loaders, warmed up (ffcv: numba compile; torch: worker start)
    common = dict(batch_size=args.batch_size, image_size=args.image_size, device=device, workers=args.threads)
    loaders = {"ffcv": build_loader("ffcv", beton, **common),
               "ffcv_linear": build_loader("ffcv", beton, interpolation="linear", **common),
               "ffcv_area": build_loader("ffcv", beton, interpolation="area", **common),
               "torch": build_loader("torch", root, **common)}
    for loader in loaders.values():
        for _ in loader:
            pass

    rates = {name: [] for name in (*loaders, "decode_pil", "decode_turbo")}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            rates[name].append(loader_rate(loader, args.epochs, device))
        rates["decode_pil"].append(pil_decode_rate(blobs, args.threads))
        rates["decode_turbo"].append(turbo_decode_rate(beton, args.threads))
    median = {name: statistics.median(values) for name, values in rates.items()}
    ceiling = max(median["decode_pil"], median["decode_turbo"])

    sizes = [Image.open(path).size for path in paths[:64]]
    print(f"{len(paths)} JPEGs, typically {statistics.mode(sizes)[0]}x{statistics.mode(sizes)[1]}, views "
          f"{args.image_size} px, batch {args.batch_size}, {args.threads} threads, device {device}, "
          f"{torch.get_num_threads()} torch threads, median of {args.rounds} rounds\n")
    print("| method | images/s | vs torch | vs decode-only |\n|---|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} | {value / median['torch']:.2f}x | {value / ceiling:.0%} |")
    print(json.dumps({"bench": "ffcv", "images": len(paths), "threads": args.threads, "device": str(device),
                      "median_images_per_s": {k: round(v, 1) for k, v in median.items()},
                      "all": {k: [round(v, 1) for v in values] for k, values in rates.items()}}))


if __name__ == "__main__":
    main()
