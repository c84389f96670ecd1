"""The bench's measured figures beyond the baselines: per backend (loader, ready inputs, end to end)
and the train step on synthetic ready inputs (MaskCo and MoCo v2, with and without the MPH, and what
MaskCo's method adds alone). Every figure is images per second (``timing.timed``)."""
from __future__ import annotations

import statistics
import time

import torch

import pipelines
from maskco import dist
from maskco.bench.timing import loader_rate, sync, timed
from maskco.build import build_run
from maskco.config import MOCOV2, method_label, replace
from maskco.engine import optimise
from maskco.method import forward_loss, ready_inputs
from maskco.model import unwrap


class StepRunner:
    """One config assembled as the trainer assembles it (``maskco.build.build_run``, one process),
    taking one optimisation step on given inputs at a fixed learning rate: what the bench times. The
    training loop itself (schedules, logging, checkpoints) is ``maskco.engine.train``."""

    def __init__(self, cfg, device):
        self.run = build_run(cfg, dist.DistInfo(rank=0, world_size=1, local_rank=0, device=device), steps_per_epoch=1)
        self.encoder_q = unwrap(self.run.encoder_q)  # the Encoder (its stride, channels, pool)
        self.generator = torch.Generator(device=device).manual_seed(0)
        for group in self.run.optimizer.param_groups:
            group["lr"] = 1e-3

    def ready(self, batch):
        return ready_inputs(batch, self.run.spec, self.generator)  # fp32 whatever the precision, as in the trainer

    def step(self, inputs) -> None:
        run = self.run
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            value, _, keys = forward_loss(run.encoder_q, run.encoder_k, inputs, run.spec, None, run.queue)
        optimise(value, run.optimizer, run.scaler, run.ema, run.momentum)
        if run.queue is not None:
            run.queue.enqueue(keys)


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
        runner = StepRunner(variant, device)
        inputs = runner.ready(batch)
        result = timed(lambda: [runner.step(inputs) for _ in range(steps)], steps * cfg.batch_size, device,
                       repeats)
        rows.append({"figure": "step", "name": method_label(variant), "mph": variant.mph, **result})
        del runner
    runner = StepRunner(cfg, device)  # boxes + augmentation + masking alone (the input side of a step)
    result = timed(lambda: [runner.ready(batch) for _ in range(steps)], steps * cfg.batch_size, device, repeats)
    rows.append({"figure": "ready_synthetic", "name": "boxes+augment+mask", **result})
    # everything a step does after the loader: what end to end is compared with (the GPU never waits
    # when e2e reaches this)
    result = timed(lambda: [runner.step(runner.ready(batch)) for _ in range(steps)], steps * cfg.batch_size,
                   device, repeats)
    rows.append({"figure": "step", "name": "ready+maskco", **result})
    method = method_overhead(cfg, batch, runner.encoder_q, device)
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


def backend_figures(backend: str, source: str, cfg, device, threads: int, batches: int, e2e_batches: int) -> list[dict]:
    """Loader, ready-input and (if e2e_batches) end-to-end figures of one backend."""
    loader = pipelines.build_loader(backend, source, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                    device=device, workers=threads, seed=0)
    loader.set_epoch(0)
    rows = [{"figure": "loader", "name": backend,
             **loader_rate(loader, batches, cfg.batch_size, device, lambda b: b.view_q)}]
    runner = StepRunner(cfg, device)
    rows.append({"figure": "ready", "name": backend,
                 **loader_rate(loader, batches, cfg.batch_size, device, runner.ready)})
    if e2e_batches:
        waits = []

        def full(batch):
            runner.step(runner.ready(batch))

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
    if isinstance(loader, pipelines.Loader):
        loader.close()
    return rows
