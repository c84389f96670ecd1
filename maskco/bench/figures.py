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
from maskco.model import unwrap
from maskco.step import Prefetcher


# the step's execution modes the bench compares (maskco.step.Step): their Config changes
MODES = {"eager": {}, "compiled": {"compile": True},
         "graphs": {"compile": True, "compile_mode": "reduce-overhead"}}  # graph-captured: CUDA only
MODE_LABELS = {"eager": "eager", "compiled": "compiled", "graphs": "graph-captured"}


class StepRunner:
    """One config assembled as the trainer assembles it (``maskco.build.build_run``, one process),
    taking one optimisation step at a fixed learning rate through the trainer's step function (its
    randomness drawn up front, then eager, compiled or graph-captured: ``mode`` in MODES): what the
    bench times. The training loop itself (schedules, logging, checkpoints) is ``maskco.engine.train``."""

    def __init__(self, cfg, device, mode: str = "eager", compile_backend: str = "inductor"):
        changes = {**MODES[mode], **({"compile_backend": compile_backend} if mode != "eager" else {})}
        self.run = build_run(replace(cfg, **changes), dist.DistInfo(rank=0, world_size=1, local_rank=0, device=device),
                             steps_per_epoch=1)
        self.encoder_q = unwrap(self.run.encoder_q)  # the Encoder (its stride, channels, pool)
        self.index = 0  # the global step whose randomness is drawn next
        for group in self.run.optimizer.param_groups:
            group["lr"] = 1e-3

    def draw(self, batch):
        self.index += 1
        return self.run.step.draw(self.index, batch.view_q.shape[0], batch.crop_q.dtype)

    def ready(self, batch):
        """Boxes, augmentation and masking alone (fp32 whatever the precision, as in the trainer)."""
        return self.run.step.ready(batch, self.draw(batch))

    def step(self, batch, noise=None, inputs=None) -> None:
        """One step; ``inputs`` made ahead (with their ``noise``), or None: the step makes them."""
        run = self.run
        value, _, keys = run.step.forward(batch, noise if noise is not None else self.draw(batch), inputs)
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


def step_figures(cfg, device, steps: int, repeats: int, modes=("eager",),
                 compile_backend: str = "inductor") -> list[dict]:
    rows = []
    batch = synthetic_batch(cfg.batch_size, cfg.image_size, device)
    # MaskCo with and without its MPH; MoCo v2 (faithful: no MPH, 65,536-key queue) and MoCo v2-like
    # with the MPH, so each MaskCo row has a same-network MoCo row (labels from config.method_label)
    for changes in ({"mph": "attn"}, {"mph": "none"}, {**MOCOV2, "method": "mocov2"},
                    {**MOCOV2, "method": "mocov2", "mph": "attn"}):
        variant = replace(cfg, **changes)
        runner = StepRunner(variant, device)
        noise = runner.draw(batch)
        inputs = runner.run.step.ready(batch, noise)
        result = timed(lambda: [runner.step(batch, noise, inputs) for _ in range(steps)], steps * cfg.batch_size,
                       device, repeats)
        rows.append({"figure": "step", "name": method_label(variant), "mph": variant.mph, **result})
        del runner
    runner = StepRunner(cfg, device)  # boxes + augmentation + masking alone (the input side of a step)
    result = timed(lambda: [runner.ready(batch) for _ in range(steps)], steps * cfg.batch_size, device, repeats)
    rows.append({"figure": "ready_synthetic", "name": "boxes+augment+mask", **result})
    # everything a step does after the loader, per execution mode: what end to end is compared with (the
    # GPU never waits when e2e reaches this); the first calls (compilation, graph capture) are untimed
    for mode in modes:
        runner = StepRunner(cfg, device, mode, compile_backend)
        started = time.perf_counter()
        for _ in range(3):  # compile (forward and backward), then the graph trees' warm-up and capture
            runner.step(batch)
        sync(device)
        warmup = time.perf_counter() - started
        result = timed(lambda: [runner.step(batch) for _ in range(steps)], steps * cfg.batch_size, device, repeats)
        rows.append({"figure": "step", "name": step_name(mode), "mode": mode, "warmup_s": warmup, **result})
        del runner
    runner = StepRunner(cfg, device)
    method = method_overhead(cfg, batch, runner.encoder_q, device)
    result = timed(lambda: [method() for _ in range(steps)], steps * cfg.batch_size, device, repeats)
    rows.append({"figure": "method_only", "name": "boxes+mask+roi_pool+logits", **result})
    return rows


def step_name(mode: str) -> str:
    """The row of the whole step after the loader in ``mode``; eager keeps its old name."""
    return "ready+maskco" if mode == "eager" else f"ready+maskco {MODE_LABELS[mode]}"


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


def backend_figures(backend: str, source: str, cfg, device, threads: int, batches: int, e2e_batches: int,
                    mode: str = "eager", compile_backend: str = "inductor") -> list[dict]:
    """Loader, ready-input and (if e2e_batches) end-to-end figures of one backend; end to end with the
    step in ``mode``, and with inputs one step ahead (maskco.step.Prefetcher) on and off where the
    backend delivers on the CPU (torch, ffcv)."""
    loader = pipelines.build_loader(backend, source, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                    device=device, workers=threads, seed=0)
    loader.set_epoch(0)
    rows = [{"figure": "loader", "name": backend,
             **loader_rate(loader, batches, cfg.batch_size, device, lambda b: b.view_q)}]
    runner = StepRunner(cfg, device)
    rows.append({"figure": "ready", "name": backend,
                 **loader_rate(loader, batches, cfg.batch_size, device, runner.ready)})
    if e2e_batches:
        runner = StepRunner(cfg, device, mode, compile_backend)
        runner.step(next(iter(loader)))  # compiled and captured before the clock starts
        for prefetch in (False, True) if not backend.startswith("dali") else (False,):
            rows.append(_end_to_end(loader, runner, prefetch, e2e_batches, cfg, device, backend, mode))
    if isinstance(loader, pipelines.Loader):
        loader.close()
    return rows


def _end_to_end(loader, runner, prefetch: bool, e2e_batches: int, cfg, device, backend: str, mode: str) -> dict:
    """Images per second of ``e2e_batches`` steps straight from the loader, and the fraction of that time
    spent waiting for the next batch; ``prefetch``: the trainer's Prefetcher between them."""
    waits = []

    def steps():
        while True:  # epoch after epoch, as many as the timed batches need
            if prefetch:  # its draws are numbered from the runner's step on: any numbers time alike
                yield from Prefetcher(loader, runner.run.step, runner.index, limit=runner.index + len(loader))
            else:
                for batch in loader:
                    yield batch, runner.draw(batch), None

    def timed_iter():
        iterator, total, wait = steps(), time.perf_counter(), 0.0
        for _ in range(e2e_batches):
            tick = time.perf_counter()
            batch, noise, inputs = next(iterator)
            sync(device)
            wait += time.perf_counter() - tick
            runner.step(batch, noise, inputs)
        sync(device)
        waits.append(wait / (time.perf_counter() - total))

    result = timed(timed_iter, e2e_batches * cfg.batch_size, device, repeats=3, warmup=1)
    name = backend + (" prefetch" if prefetch else "") + ("" if mode == "eager" else f" {MODE_LABELS[mode]}")
    return {"figure": "e2e", "name": name, "prefetch": prefetch, "mode": mode, **result,
            "data_wait": statistics.median(waits)}
