"""``python -m maskco.bench``: where the time goes, against baselines measured in the same run.

Figures (img/s, median and spread over repeats, each after a warm-up, device synchronised around
the timed region):
  decode      decode-only ceiling: libjpeg-turbo (torchvision.io.decode_jpeg) on the same files and threads
  baseline    the reference MoCo v2 input pipeline (ImageFolder + PIL + two-crop MoCo v2 transforms)
  loader      each backend's Batch (two uint8 views + windows) on the device
  ready       loader + boxes + photometric augmentation + masking + normalisation (what the model eats)
  step        train step on synthetic ready inputs: maskco and mocov2, with and without the MPH
  e2e         real data, full step, per backend; and the fraction of the time spent waiting for data
  roi_pool    fused vs reference, forward + backward (maskco.microbench)
Output: a table on the terminal, JSON lines in out_dir/bench.jsonl, a bar chart out_dir/bench.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import pipelines
from maskco import microbench
from maskco.config import MOCOV2, build_config, method_label, replace
from maskco.engine import optimise
from maskco.method import MethodSpec, forward_loss, ready_inputs
from maskco.bench_baselines import baseline_loader, decode_ceiling
from maskco.bench_report import environment, report, targets
from maskco.bench_timing import loader_rate, sync, timed
from maskco.build import amp_dtype, build_encoders, build_optimizer, build_queue
from maskco.model import KeyEncoderEMA


# ---- 5. the step on synthetic ready inputs
class Trainer:
    """The trainer's pieces (same builders as maskco.train) for one config, stepping on given inputs."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.encoder_q, self.encoder_k = build_encoders(cfg, device, distributed=False)
        self.ema = KeyEncoderEMA(self.encoder_k, self.encoder_q)
        self.optimizer = build_optimizer(cfg, self.encoder_q, device)
        self.spec = MethodSpec.from_config(cfg, shuffle_bn=False)
        self.dtype = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.queue = build_queue(cfg, device)
        self.generator = torch.Generator(device=device).manual_seed(0)
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-3

    def ready(self, batch):
        return ready_inputs(batch, self.spec, self.generator)  # fp32 whatever the precision, as in the trainer

    def step(self, inputs) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            value, _, keys = forward_loss(self.encoder_q, self.encoder_k, inputs, self.spec, None, self.queue)
        optimise(value, self.optimizer, self.scaler, self.ema, self.cfg.momentum)
        if self.queue is not None:
            self.queue.enqueue(keys)


def synthetic_batch(batch_size: int, image_size: int, device) -> pipelines.Batch:
    generator = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (2, batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    lo = torch.rand(2, batch_size, 2, generator=generator) * 0.3
    hi = lo + 0.5 + torch.rand(2, batch_size, 2, generator=generator) * 0.2
    flip = (torch.rand(2, batch_size, 1, generator=generator) < 0.5).float()
    crops = torch.cat([lo, hi, flip], dim=-1)  # [2, N, 5]
    return pipelines.Batch(views[0], views[1], crops[0], crops[1]).to(device)


def step_figures(cfg, device, steps: int, repeats: int) -> list[dict]:
    rows = []
    batch = synthetic_batch(cfg.batch_size, cfg.image_size, device)
    # MaskCo with and without its MPH; MoCo v2 (faithful: no MPH, 65,536-key queue) and MoCo v2-like
    # with the MPH, so each MaskCo row has a same-network MoCo row (labels from config.method_label)
    for changes in ({"mph": "attn"}, {"mph": "none"}, {**MOCOV2, "method": "mocov2"},
                    {**MOCOV2, "method": "mocov2", "mph": "attn"}):
        variant = replace(cfg, **changes)
        trainer = Trainer(variant, device)
        inputs = trainer.ready(batch)
        result = timed(lambda: [trainer.step(inputs) for _ in range(steps)], steps * cfg.batch_size, device,
                       repeats)
        rows.append({"figure": "step", "name": method_label(variant), "mph": variant.mph, **result})
        del trainer
    trainer = Trainer(cfg, device)  # boxes + augmentation + masking alone (the input side of a step)
    result = timed(lambda: [trainer.ready(batch) for _ in range(steps)], steps * cfg.batch_size, device, repeats)
    rows.append({"figure": "ready_synthetic", "name": "boxes+augment+mask", **result})
    # everything a step does after the loader: what end to end is compared with (the GPU never waits
    # when e2e reaches this)
    result = timed(lambda: [trainer.step(trainer.ready(batch)) for _ in range(steps)], steps * cfg.batch_size,
                   device, repeats)
    rows.append({"figure": "step", "name": "ready+maskco", **result})
    method = method_overhead(cfg, batch, trainer.encoder_q, device)
    result = timed(lambda: [method() for _ in range(steps)], steps * cfg.batch_size, device, repeats)
    rows.append({"figure": "method_only", "name": "boxes+mask+roi_pool+logits", **result})
    return rows


def method_overhead(cfg, batch, encoder, device):
    """What MaskCo adds to a MoCo v2 step, alone: box sampling, masking, RoI pooling of the query and
    key boxes (forward + backward) and the logits + loss (forward + backward), at the run's shapes."""
    from maskco import augment, boxes, loss

    n, side = cfg.batch_size, cfg.image_size // encoder.stride
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, 3, cfg.image_size, cfg.image_size, device=device)
    features_q = torch.randn(n, encoder.channels, side, side, device=device, requires_grad=True)
    features_k = torch.randn(n, encoder.channels, side, side, device=device)
    embedded = torch.randn(n, 2 + cfg.num_negatives, cfg.head_dim, device=device, requires_grad=True)

    def run():
        sample = boxes.sample_boxes(batch.crop_q, batch.crop_k, cfg.image_size, cfg.num_negatives, generator,
                                    min_size=cfg.box_min_size, check_values=False)
        augment.mask_boxes(x, sample.masked, cfg.mask_mode, generator)
        pooled_q = encoder.pool(features_q, sample.masked[:, None])  # [N, 1, C]: the trainer's box mapping + pool
        with torch.no_grad():
            encoder.pool(features_k, sample.keys)  # [N, 1+M, C]
        q = torch.nn.functional.normalize(embedded[:, 0], dim=-1)  # [N, D]
        k = torch.nn.functional.normalize(embedded[:, 1:], dim=-1).detach()  # [N, 1+M, D]
        value = loss.contrastive_loss(q, k, sample.valid, cfg.temperature) + pooled_q.float().sum() * 0
        value.backward()

    return run


# ---- 3, 4, 6: per backend
def backend_figures(backend: str, source: str, cfg, device, threads: int, batches: int, e2e_batches: int) -> list[dict]:
    """Loader, ready-input and (if e2e_batches) end-to-end figures of one backend."""
    loader = pipelines.build_loader(backend, source, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                    device=device, workers=threads, seed=0)
    loader.set_epoch(0)
    rows = [{"figure": "loader", "name": backend,
             **loader_rate(loader, batches, cfg.batch_size, device, lambda b: b.view_q)}]
    trainer = Trainer(cfg, device)
    rows.append({"figure": "ready", "name": backend,
                 **loader_rate(loader, batches, cfg.batch_size, device, trainer.ready)})
    if e2e_batches:
        waits = []

        def full(batch):
            trainer.step(trainer.ready(batch))

        def timed_iter():
            iterator, total, wait = iter(loader), time.perf_counter(), 0.0
            for _ in range(e2e_batches):
                tick = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    iterator = iter(loader)
                    batch = next(iterator)
                sync(device)
                wait += time.perf_counter() - tick
                full(batch)
            sync(device)
            waits.append(wait / (time.perf_counter() - total))

        full(next(iter(loader)))
        result = timed(timed_iter, e2e_batches * cfg.batch_size, device, repeats=3, warmup=0)
        rows.append({"figure": "e2e", "name": backend, **result, "data_wait": statistics.median(waits)})
    if hasattr(loader, "close"):
        loader.close()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskco.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="all", help="all | torch | ffcv | dali | dali-cpu (comma list)")
    parser.add_argument("--data", default="", help="ImageFolder root (default: a generated benchmark set)")
    parser.add_argument("--ffcv-data", default="", help=".beton for the ffcv backend (default: written from --data)")
    parser.add_argument("--images", type=int, default=1000, help="size of the generated benchmark set")
    parser.add_argument("--config", default="", help="a preset for the model (default: ResNet-50 defaults)")
    parser.add_argument("--arch", default="", help="default: resnet50 on a GPU, resnet18 on a CPU (where a "
                        "ResNet-50 step takes tens of seconds)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, default=0,
                        help="batches per timed loader repeat (0: 8 x threads, so that the batches a loader "
                             "prefetched before the clock started - about 2 per worker - weigh little)")
    parser.add_argument("--steps", type=int, default=0, help="steps per timed step repeat (0: 10 on a GPU, 1 on a CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip", default="", help="comma list of figures to skip: decode,baseline,loader,step,e2e,roi")
    parser.add_argument("--out-dir", default="runs/bench")
    args = parser.parse_args(argv)
    args.batches = args.batches or max(8, 8 * args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    skip = set(filter(None, args.skip.split(",")))
    args.arch = args.arch or ("resnet50" if device.type == "cuda" else "resnet18")
    args.steps = args.steps or (10 if device.type == "cuda" else 1)
    cfg = build_config([args.config] if args.config else [], base=dict(
        arch=args.arch, batch_size=args.batch_size, image_size=args.image_size,
        box_min_size=min(16.0, args.image_size / 8), workers=args.threads))
    env = environment(device, args.threads)
    print(json.dumps(env))
    root = args.data
    if not root:
        from pipelines.sample_data import make_sample_data

        root = make_sample_data(os.path.join("data", f"bench{args.images}"), num_images=args.images)
    from pipelines.sources import list_images

    paths = list_images(root).paths
    rows = []

    def add(new_rows):
        for row in new_rows:
            rows.append(row)
            print(json.dumps(row), flush=True)

    if "decode" not in skip:
        add([{"figure": "decode", "name": "decode", **decode_ceiling(paths, args.threads, device, args.repeats)}])
    if "baseline" not in skip:
        add([{"figure": "baseline", "name": "baseline",
              **baseline_loader(root, args.batch_size, args.image_size, args.threads, device, args.batches)}])
    wanted = list(pipelines.BACKENDS) if args.backend == "all" else args.backend.split(",")
    available = pipelines.available_backends()
    for backend in wanted:
        if available.get(backend, "unknown backend"):
            add([{"figure": "skipped", "name": backend, "reason": available.get(backend, "unknown backend"),
                  "img_per_s": 0.0, "min": 0.0, "max": 0.0}])
            continue
        if backend == "dali" and device.type != "cuda":
            add([{"figure": "skipped", "name": backend, "reason": "no CUDA device (dali-cpu runs DALI on the CPU)",
                  "img_per_s": 0.0, "min": 0.0, "max": 0.0}])
            continue
        source = root
        if backend == "ffcv":
            source = args.ffcv_data or _beton(root, args.out_dir)
        if "loader" not in skip:
            # on a GPU the loader must outrun the step for many batches; on a CPU the step dominates
            e2e_batches = 0 if "e2e" in skip else (args.batches if device.type == "cuda" else args.steps)
            add(backend_figures(backend, source, cfg, device, args.threads, args.batches, e2e_batches))
    if "step" not in skip:
        add(step_figures(cfg, device, args.steps, args.repeats))
    if "roi" not in skip:
        add([{"figure": "micro", "name": f"{r['group']}/{r['impl']}", **r, "img_per_s": 1000.0 / r["median_ms"],
              "min": 1000.0 / r["max_ms"], "max": 1000.0 / r["min_ms"], "unit": "calls/s"}
             for r in microbench.run(device, None if device.type == "cpu" else 20)])
    report([r for r in rows if r["figure"] != "skipped"], args.out_dir, env)
    for row in rows:
        if row["figure"] == "skipped":
            print(f"skipped {row['name']}: {row['reason']}")
    for line in targets(rows):
        print(line)
    with open(os.path.join(args.out_dir, "bench.jsonl"), "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**env, "figure": "targets", "lines": targets(rows)}) + "\n")
    return 0


def _beton(root: str, out_dir: str) -> str:
    """Write (once) a .beton of the benchmark images for the ffcv backend."""
    from pipelines import ffcv_writer

    path = os.path.join(out_dir, os.path.basename(os.path.normpath(root)) + ".beton")
    if not os.path.exists(path):
        ffcv_writer.write_beton(root, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
