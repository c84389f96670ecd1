"""How a training step runs: eager, compiled whole, or graph-captured; and its inputs one step ahead.

A step is three parts (docs/DESIGN.md 5.1):

    noise = draw(step)                         every random tensor, from generators seeded by (seed, step, rank)
    value, stats, keys = forward(batch, noise) pure: ready inputs, query and key forward, logits, InfoNCE
    engine.optimise(value, ...)                backward, the (fused) optimiser step, the EMA of the key encoder

``forward`` is a pure function of tensors with static shapes and no host sync, so ``torch.compile``
traces it whole (no graph break in one process; tests/test_step.py asks ``torch._dynamo.explain``) and
AOTAutograd compiles its backward; ``compile_mode=reduce-overhead`` replays both as CUDA graphs. The
randomness stays a function of (seed, step, rank) whatever the mode, so a resumed run draws what the
uninterrupted one drew, and eager and compiled runs see the same numbers.

:class:`Prefetcher` issues the next batch's host-to-device copy and its ready inputs on a side CUDA
stream while the current step runs, for the backends that deliver on the CPU (torch, ffcv).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from maskco import augment, vocab
from maskco.method import Inputs, MethodSpec, Noise, draw_noise, inputs_from_noise, loss_from_inputs

COMPILE_MODES, PREFETCH = vocab.COMPILE_MODES, vocab.PREFETCH
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that capture CUDA graphs


def cuda_flags(device: torch.device) -> None:
    """The flags every step on CUDA runs under, the trainer's and the bench's alike (maskco.build sets them):
    TF32 matmuls and convolutions, cuDNN autotuning (static shapes: one search per shape). They are part of
    Inductor's cache key, so only with the same flags do the bench and the trainer share compiled code."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 4099 + rank


class Step:
    """A run's step function: draws the randomness of a step and computes its loss, eagerly or compiled.

    model: maskco.build.Model (the encoders, the queue, the device and autocast dtype it reads); spec:
    the method's values; seed, rank: the randomness of step s is drawn from (seed, s, rank). compile:
    torch.compile the forward (ready inputs + query and key forward + logits + loss; AOTAutograd compiles
    the backward), with ``mode`` and ``backend``. Graph-captured modes (``reduce-overhead``) replay the
    compiled forward and backward as CUDA graphs; the optimiser step, the EMA and the queue update stay
    outside (see docs/DESIGN.md 5.1 for why).
    """

    def __init__(self, model, spec: MethodSpec, seed: int, rank: int, compile: bool = False, mode: str = "default",
                 backend: str = "inductor"):
        self.model, self.spec, self.seed, self.rank, self.device = model, spec, seed, rank, model.device
        self.generator = torch.Generator(device=self.device)  # boxes, augmentation, mask noise: per rank
        self.shuffle_generator = torch.Generator(device=self.device)  # shuffle-BN: identical on every rank
        # made once, before any compilation: a graph that made them would hold a host-to-device copy
        self.mean_std = augment.normalize_constants(self.device)
        self.graphs = compile and mode in GRAPH_MODES
        if compile:
            options = dict(mode=None if mode == "default" else mode, backend=backend, dynamic=False)
            self._forward = torch.compile(self._eager_forward, **options)
            self._loss = torch.compile(self._eager_loss, **options)
            # never graph-captured: the prefetcher keeps one step's ready inputs while it makes the next
            # step's, and a replay would overwrite the first (its outputs live in the graph's memory pool)
            ready_mode = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode,
                                                                                                options["mode"])
            self._ready = torch.compile(self._eager_ready, **{**options, "mode": ready_mode})
        else:
            self._forward, self._loss, self._ready = self._eager_forward, self._eager_loss, self._eager_ready

    def draw(self, step: int, n: int, box_dtype=torch.float32) -> Noise:
        """Every random tensor of global step ``step`` for ``n`` images: the same whatever the mode."""
        self.generator.manual_seed(step_seed(self.seed, step, self.rank))
        self.shuffle_generator.manual_seed(step_seed(self.seed, step, 0))
        return draw_noise(self.spec, n, self.device, self.generator, self.shuffle_generator, box_dtype)

    def forward(self, batch, noise: Noise, inputs: Optional[Inputs] = None):
        """-> (loss, stats, positive keys). ``inputs``: ready inputs made ahead (:class:`Prefetcher`);
        None: made here, inside the same compiled graph as the rest."""
        if self.graphs:  # a new iteration of the captured graphs: the last step's outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        negatives = self.model.queue.negatives() if self.model.queue is not None else None
        if inputs is None:
            return self._forward(batch.view_q, batch.view_k, batch.crop_q, batch.crop_k, noise, negatives)
        return self._loss(inputs, noise.shuffle, negatives)

    def ready(self, batch, noise: Noise) -> Inputs:
        """The ready inputs alone (boxes, augmentation, masking), compiled like the rest."""
        return self._ready(batch.view_q, batch.view_k, batch.crop_q, batch.crop_k, noise)

    # ---- the pure functions that get compiled (tensors in, tensors out)
    def _eager_ready(self, view_q, view_k, crop_q, crop_k, noise: Noise) -> Inputs:
        return inputs_from_noise(_Views(view_q, view_k, crop_q, crop_k), self.spec, noise, self.mean_std)

    def _eager_loss(self, inputs: Inputs, permutation, negatives):
        model = self.model
        with torch.autocast(self.device.type, dtype=model.amp_dtype, enabled=model.amp_dtype is not None):
            return loss_from_inputs(model.encoder_q, model.encoder_k, inputs, self.spec, permutation, negatives)

    def _eager_forward(self, view_q, view_k, crop_q, crop_k, noise: Noise, negatives):
        inputs = self._eager_ready(view_q, view_k, crop_q, crop_k, noise)  # fp32: autocast is off inside
        return self._eager_loss(inputs, noise.shuffle, negatives)


class _Views:
    """The four tensors of a Batch that the step reads (a Batch holds more: labels, indices)."""

    __slots__ = ("view_q", "view_k", "crop_q", "crop_k")

    def __init__(self, view_q, view_k, crop_q, crop_k):
        self.view_q, self.view_k, self.crop_q, self.crop_k = view_q, view_k, crop_q, crop_k


def use_prefetch(setting: str, backend: str, device: torch.device) -> bool:
    """``prefetch=auto``: on for the backends that deliver on the CPU (torch, ffcv) when training on CUDA;
    DALI's batches are already on the GPU, made on its own streams. ``on`` also works on the CPU, where
    it only reorders work (the next batch's ready inputs before this step's forward): same results."""
    if setting == "auto":
        return device.type == "cuda" and not backend.startswith("dali")
    return setting == "on"


def plain_steps(loader, step: Step, start_step: int) -> Iterator:
    """``(batch, noise, None)`` for consecutive global steps from ``start_step``: what :class:`Prefetcher`
    yields, with the ready inputs left to the step (inside its compiled graph)."""
    for index, batch in enumerate(loader, start_step):
        yield batch, step.draw(index, batch.view_q.shape[0], batch.crop_q.dtype), None


class Prefetcher:
    """Yields ``(batch, noise, inputs)`` for consecutive global steps from ``start_step``, each batch's
    host-to-device copy and ready inputs issued one step ahead.

    On CUDA the next batch is fetched (the loader's ``.to(device, non_blocking=True)`` runs under the
    side stream), its noise drawn and its ready inputs computed on a side stream while the current
    step's kernels run on the default stream; the consumer's stream waits on an event before it uses
    them, and every tensor handed over is ``record_stream``-ed on the consumer's stream, so the caching
    allocator does not reuse its memory while that stream still reads it. On the CPU the same order of
    work happens on the one stream (nothing overlaps; results are the same as the plain loop).
    Batches, their order and every drawn number equal the plain loop's (tests/test_step.py).
    """

    def __init__(self, loader, step: Step, start_step: int, limit: int):
        self.loader, self.step, self.next_step, self.limit = loader, step, start_step, limit
        self.cuda = step.device.type == "cuda"
        self.stream = torch.cuda.Stream(step.device) if self.cuda else None

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        ahead = self._fetch(iterator)
        while ahead is not None:
            current, event = ahead
            if self.cuda:
                consumer = torch.cuda.current_stream(self.step.device)
                consumer.wait_event(event)
                for tensor in _tensors(current):
                    tensor.record_stream(consumer)
            ahead = self._fetch(iterator)  # the next batch's work is queued before this step's
            yield current

    def _fetch(self, iterator):
        """-> ((batch, noise, inputs), event) of the next step, or None at the end of the epoch."""
        if self.next_step >= self.limit:
            return None
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            batch = next(iterator, None)
            if batch is None:
                return None
            noise = self.step.draw(self.next_step, batch.view_q.shape[0], batch.crop_q.dtype)
            inputs = self.step.ready(batch, noise)
            event = self.stream.record_event() if self.cuda else None
        self.next_step += 1
        return (batch, noise, inputs), event


def _tensors(item) -> list:
    """Every tensor inside (batch, noise, inputs), nested tuples and dataclass fields included."""
    found, stack = [], [item]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            stack.extend(value)
        elif hasattr(value, "__dataclass_fields__"):
            stack.extend(getattr(value, name) for name in value.__dataclass_fields__)
    return found
