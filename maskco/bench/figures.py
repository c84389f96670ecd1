"""The bench's measured figures beyond the baselines: per backend (loader, ready inputs, end to end)
and the train step on synthetic ready inputs (MaskCo and MoCo v2, with and without the MPH, and what
MaskCo's method adds alone). Every figure is images per second (``timing.timed``)."""
from __future__ import annotations

import statistics
import time

import torch

import pipelines
from maskco import dist
from maskco.bench import capture
from maskco.bench.timing import fitting_batches, loader_rate, sync, timed
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
        self.encoder_q = unwrap(self.run.model.encoder_q)  # the Encoder (its stride, channels, pool)
        self.index = 0  # the global step whose randomness is drawn next
        for group in self.run.model.optimizer.param_groups:
            group["lr"] = 1e-3

    def draw(self, batch):
        self.index += 1
        return self.run.step.draw(self.index, batch.view_q.shape[0], batch.crop_q.dtype)

    def ready(self, batch):
        """Boxes, augmentation and masking alone (fp32 whatever the precision, as in the trainer)."""
        return self.run.step.ready(batch, self.draw(batch))

    def step(self, batch, noise=None, inputs=None) -> None:
        """One step; ``inputs`` made ahead (with their ``noise``), or None: the step makes them."""
        model = self.run.model
        value, _, keys = self.run.step.forward(batch, noise if noise is not None else self.draw(batch), inputs)
        optimise(value, model.optimizer, model.scaler, model.ema, self.run.schedule.momentum)
        if model.queue is not None:
            model.queue.enqueue(keys)


def synthetic_batch(batch_size: int, image_size: int, device) -> pipelines.Batch:
    generator = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (2, batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    lo = torch.rand(2, batch_size, 2, generator=generator) * 0.3
    hi = lo + 0.5 + torch.rand(2, batch_size, 2, generator=generator) * 0.2
    flip = (torch.rand(2, batch_size, 1, generator=generator) < 0.5).float()
    crops = torch.cat([lo, hi, flip], dim=-1)  # [2, N, 5]
    return pipelines.Batch(views[0], views[1], crops[0], crops[1]).to(device)


def step_figures(cfg, device, steps: int, repeats: int, modes=("eager",),
                 compile_backend: str = "inductor", variants: bool = True, mocov2_queue: int = MOCOV2["queue_size"]):
    """Yield each step figure the moment it is measured, the most wanted first: the whole step after the
    loader in each of ``modes``, then what the method's input side costs, then (``variants``) the MaskCo /
    MoCo pairs (the MoCo v2 rows with a queue of ``mocov2_queue`` keys)."""
    batch = synthetic_batch(cfg.batch_size, cfg.image_size, device)
    # everything a step does after the loader, per execution mode: what end to end is compared with (the
    # GPU never waits when e2e reaches this); the first calls (compilation, graph capture) are untimed
    for mode in modes:
        counter = capture.Counter(device)
        runner = StepRunner(cfg, device, mode, compile_backend)
        warmup = warm_up(runner, batch, device)
        result = timed(lambda: [runner.step(batch) for _ in range(steps)], steps * cfg.batch_size, device, repeats)
        yield {"figure": "step", "name": step_name(mode), "mode": mode, "warmup_s": warmup, **result,
               **(counter.fields() if mode == "graphs" else {})}
        runner = None  # frees its model and graphs before the next
    runner = StepRunner(cfg, device)  # boxes + augmentation + masking alone (the input side of a step)
    result = timed(lambda: [runner.ready(batch) for _ in range(steps)], steps * cfg.batch_size, device, repeats)
    yield {"figure": "ready_synthetic", "name": "boxes+augment+mask", **result}
    method = method_overhead(cfg, batch, runner.encoder_q, device)
    result = timed(lambda: [method() for _ in range(steps)], steps * cfg.batch_size, device, repeats)
    yield {"figure": "method_only", "name": "boxes+mask+roi_pool+logits", **result}
    runner = None  # frees its model and graphs before the next
    if not variants:
        return
    # MaskCo with and without its MPH; MoCo v2 (faithful: no MPH, 65,536-key queue) and MoCo v2-like
    # with the MPH, so each MaskCo row has a same-network MoCo row (labels from config.method_label)
    mocov2 = {**MOCOV2, "method": "mocov2", "queue_size": mocov2_queue}
    for changes in ({"mph": "attn"}, {"mph": "none"}, mocov2, {**mocov2, "mph": "attn"}):
        variant = replace(cfg, **changes)
        runner = StepRunner(variant, device)
        noise = runner.draw(batch)
        inputs = runner.run.step.ready(batch, noise)
        result = timed(lambda: [runner.step(batch, noise, inputs) for _ in range(steps)], steps * cfg.batch_size,
                       device, repeats)
        yield {"figure": "step", "name": method_label(variant), "mph": variant.mph, **result}
        runner = None  # frees its model and graphs before the next


def warm_up(runner: StepRunner, batch, device, prefetched: bool = False) -> float:
    """Seconds of the untimed first steps: compilation (forward and backward), then the graph trees' warm-up
    and capture. ``prefetched``: the step from ready inputs made apart (the Prefetcher's pair of graphs)."""
    started = time.perf_counter()
    for _ in range(3):
        if prefetched:
            noise = runner.draw(batch)
            runner.step(batch, noise, runner.run.step.ready(batch, noise))
        else:
            runner.step(batch)
    sync(device)
    return time.perf_counter() - started


def compile_figures(cfg, device, modes, compile_backend: str = "inductor", prefetched: bool = False):
    """Only compile (and capture) what the same bench would: each mode's whole step, or (``prefetched``) the
    Prefetcher's pair of graphs in each mode; nothing timed. With a shared Inductor cache
    (TORCHINDUCTOR_CACHE_DIR) several of these can run at once, each on one graph, ahead of the timed runs."""
    batch = synthetic_batch(cfg.batch_size, cfg.image_size, device)
    for mode in modes:
        counter = capture.Counter(device)
        runner = StepRunner(cfg, device, mode, compile_backend)
        warmup = warm_up(runner, batch, device, prefetched)
        yield {"figure": "compile", "name": mode + (" prefetch" if prefetched else ""), "mode": mode,
               "warmup_s": warmup, **(counter.fields() if mode == "graphs" else {})}
        runner = None  # frees its model and graphs before the next


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
                    mode: str = "eager", compile_backend: str = "inductor", **backend_options):
    """Yield the loader, ready-input and (if e2e_batches) end-to-end figures of one backend as measured; end
    to end with the step in ``mode``, and with inputs one step ahead (maskco.step.Prefetcher) off and on
    where the backend delivers on the CPU (torch, ffcv). Each figure keeps one iterator for all its repeats."""
    loader = pipelines.build_loader(backend, source, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                    device=device, workers=threads, seed=0, **backend_options)
    try:
        warmup = max(1, min(2 * threads, len(loader) // 2))  # a DataLoader prefetches ~2 batches per worker
        loader.set_epoch(0)
        yield {"figure": "loader", "name": backend, **backend_options,
               **loader_rate(loader, batches, cfg.batch_size, device, lambda b: b.view_q, warmup_batches=warmup)}
        runner = StepRunner(cfg, device)
        loader.set_epoch(0)
        yield {"figure": "ready", "name": backend,
               **loader_rate(loader, batches, cfg.batch_size, device, runner.ready, warmup_batches=warmup)}
        if e2e_batches:
            runner = StepRunner(cfg, device, mode, compile_backend)
            for prefetch in (False, True) if not backend.startswith("dali") else (False,):
                yield _end_to_end(loader, runner, prefetch, e2e_batches, cfg, device, backend, mode)
    finally:
        loader.close()


def _end_to_end(loader, runner, prefetch: bool, e2e_batches: int, cfg, device, backend: str, mode: str,
                repeats: int = 3) -> dict:
    """Images per second of ``e2e_batches`` steps straight from the loader (a warm-up round, then ``repeats``
    rounds, from one iterator), and the fraction of that time spent waiting for the next batch;
    ``prefetch``: the trainer's Prefetcher between them. The first steps compile and capture, untimed."""
    per_repeat = fitting_batches(loader, e2e_batches, repeats, warmup_batches=e2e_batches)
    counter = capture.Counter(device)
    loader.set_epoch(0)
    if prefetch:  # its draws are numbered from the runner's step on: any numbers time alike
        items = iter(Prefetcher(loader, runner.run.step, runner.index, limit=runner.index + len(loader)))
    else:
        items = ((batch, runner.draw(batch), None) for batch in loader)
    waits = []

    def timed_iter():
        total, wait = time.perf_counter(), 0.0
        for _ in range(per_repeat):
            tick = time.perf_counter()
            batch, noise, inputs = next(items)
            sync(device)
            wait += time.perf_counter() - tick
            runner.step(batch, noise, inputs)
        sync(device)
        waits.append(wait / (time.perf_counter() - total))

    started = time.perf_counter()
    timed_iter()  # the warm-up round: compilation and capture of this loop's graphs, workers at speed
    warmup = time.perf_counter() - started
    result = timed(timed_iter, per_repeat * cfg.batch_size, device, repeats=repeats, warmup=0)
    name = backend + (" prefetch" if prefetch else "") + ("" if mode == "eager" else f" {MODE_LABELS[mode]}")
    return {"figure": "e2e", "name": name, "prefetch": prefetch, "mode": mode, **result, "batches": per_repeat,
            "warmup_s": warmup, "data_wait": statistics.median(waits[1:]),
            **(counter.fields() if mode == "graphs" else {})}
