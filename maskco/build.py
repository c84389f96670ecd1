"""Assembly: what a run is built from, shared by the trainer, the bench and ``show``.

Everything here that must agree across ranks (both encoders, the queue's initial keys) is built the
same way on every rank *and* then broadcast from rank 0: the key encoder is a copy of the query
encoder taken after that broadcast, outside DDP, so DDP's own broadcast (of ``encoder_q`` only) is not
what makes the ranks agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from maskco import dist, schedule, step
from maskco.config import Config, ConfigError, global_batch, peak_lr
from maskco.loss import KeyQueue
from maskco.method import MethodSpec
from maskco.model import Encoder, KeyEncoderEMA, build_key_encoder, param_groups, set_virtual_gpus


@dataclass
class Model:
    """What training changes and a checkpoint holds: both encoders (the query one DDP-wrapped under a
    process group), the EMA that moves the key encoder, the optimiser, the scaler and MoCo's queue."""

    encoder_q: torch.nn.Module
    encoder_k: torch.nn.Module
    ema: KeyEncoderEMA  # encoder_k <- encoder_q
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    queue: Optional[KeyQueue]
    device: torch.device
    amp_dtype: Optional[torch.dtype]

    def release(self) -> None:
        """Drop DDP and the optimiser (before the process group goes, ``dist.shutdown``)."""
        self.encoder_q = self.optimizer = self.ema = None


@dataclass(frozen=True)
class Schedule:
    """The run's numbers over its steps: how long, the learning rate and EMA momentum at a step, and the
    logging and checkpoint cadence."""

    epochs: int
    total_steps: int  # the schedule's length: all epochs
    stop_step: int  # where this invocation stops: total_steps, or max_steps if smaller
    warmup_steps: int
    peak_lr: float
    min_lr: float
    momentum: float
    momentum_schedule: str
    global_batch: int
    log_every: int
    ckpt_every: int

    @classmethod
    def from_config(cls, cfg: Config, world_size: int, steps_per_epoch: int) -> "Schedule":
        total_steps = cfg.epochs * steps_per_epoch  # the LR / momentum schedules always span all epochs
        return cls(epochs=cfg.epochs, total_steps=total_steps,
                   stop_step=min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps,
                   warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)), peak_lr=peak_lr(cfg, world_size),
                   min_lr=cfg.min_lr, momentum=cfg.momentum, momentum_schedule=cfg.momentum_schedule,
                   global_batch=global_batch(cfg, world_size), log_every=cfg.log_every, ckpt_every=cfg.ckpt_every)

    def lr(self, step: int) -> float:
        return schedule.cosine(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)

    def ema_momentum(self, step: int) -> float:
        return schedule.ema_momentum(step, self.total_steps, self.momentum, self.momentum_schedule)


@dataclass(frozen=True)
class Run:
    """The assembled pieces the loop needs (maskco.engine.train), each with one owner: the trained
    state, the schedule, and the step function over that state."""

    model: Model
    schedule: Schedule
    step: step.Step  # draws a step's randomness and computes its loss (eager or compiled)
    prefetch: bool = False  # inputs one step ahead (maskco.step.Prefetcher)


def key_batchnorm(encoder_k: torch.nn.Module, key_bn: str, device: torch.device, distributed: bool):
    """``key_bn=sync``: the key branch's BatchNorm takes the statistics of the whole global batch, every
    rank and every virtual GPU (SyncBatchNorm under DDP, one group in one process); the query branch
    keeps per-GPU BN, as with shuffle-BN. shuffle and local leave the key encoder's BatchNorm as it is
    (per virtual GPU)."""
    if key_bn != "sync":
        return encoder_k
    set_virtual_gpus(encoder_k, 1)
    if not distributed:
        return encoder_k
    if device.type != "cuda":
        raise ConfigError("key_bn=sync needs CUDA (SyncBatchNorm runs only on GPUs); use key_bn=shuffle")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(encoder_k)


def encoder_of(cfg: Config) -> Encoder:
    """A randomly initialised query encoder of ``cfg``'s shape (seed it first), on the CPU, plain BatchNorm."""
    return Encoder(cfg.arch, dilated=cfg.dilated, mph=cfg.mph, mph_width=cfg.mph_width, mph_layers=cfg.mph_layers,
                   mph_heads=cfg.mph_heads, head_hidden=cfg.head_hidden, head_dim=cfg.head_dim,
                   roi_output_size=cfg.roi_output_size, roi_sampling_ratio=cfg.roi_sampling_ratio,
                   roi_fused=cfg.roi_fused, roi_centering=cfg.roi_centering, stem=cfg.stem, width=cfg.width,
                   init=cfg.init)


def build_encoders(cfg: Config, device: torch.device, distributed: bool):
    """-> (encoder_q, encoder_k), bit-identical on every rank whatever each rank's RNG state."""
    with torch.random.fork_rng(devices=[]):  # the same init on every rank, without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        encoder_q = encoder_of(cfg)
    # G virtual GPUs: BatchNorm per group of batch_size / G, in both encoders (the key copy inherits it)
    encoder_q = set_virtual_gpus(encoder_q, cfg.virtual_gpus) if cfg.virtual_gpus > 1 else encoder_q
    encoder_q = encoder_q.to(device)
    dist.broadcast_module(encoder_q)  # rank 0's weights everywhere, before the key copy is taken
    # after the broadcast: collectives take contiguous tensors, channels_last conv weights are not
    encoder_q = encoder_q.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    encoder_k = build_key_encoder(encoder_q)  # outside DDP: never re-broadcast
    return encoder_q, key_batchnorm(encoder_k, cfg.key_bn, device, distributed)


def check_compile(cfg: Config, device: torch.device) -> None:
    """ConfigError for a compile setting this device or this torch cannot run."""
    if not cfg.compile:
        return
    if cfg.compile_mode in step.GRAPH_MODES and device.type != "cuda":
        raise ConfigError(f"compile_mode={cfg.compile_mode} captures CUDA graphs and needs a GPU; on {device.type} "
                          f"use compile_mode=default or max-autotune-no-cudagraphs")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if cfg.compile_backend not in backends:
        raise ConfigError(f"compile_backend={cfg.compile_backend!r} is not a torch.compile backend; use one of "
                          f"{', '.join(torch._dynamo.list_backends())}")


def build_optimizer(cfg: Config, encoder_q: torch.nn.Module, device: torch.device) -> torch.optim.SGD:
    # fused SGD (one kernel for all parameters) on CUDA; the foreach path elsewhere
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    groups = param_groups(encoder_q, cfg.weight_decay, cfg.weight_decay_all)
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.sgd_momentum, **fast)


def build_queue(cfg: Config, device: torch.device) -> Optional[KeyQueue]:
    """MoCo's queue of past keys (None when queue_size is 0); its random initial keys are drawn from
    ``cfg.seed`` alone, so every rank starts with the same queue (every rank then enqueues the same
    all-gathered keys, so it stays the same)."""
    if not cfg.queue_size:
        return None
    generator = torch.Generator().manual_seed(cfg.seed)
    return KeyQueue(cfg.queue_size, cfg.head_dim, device=device, generator=generator)


def build_run(cfg: Config, info: dist.DistInfo, steps_per_epoch: int) -> Run:
    """Encoders (DDP-wrapped query under a process group), optimiser, scaler, queue, schedule and step."""
    device = info.device
    check_compile(cfg, device)
    step.cuda_flags(device)  # the trainer's and the bench's: one compile cache serves both
    encoder_q, encoder_k = build_encoders(cfg, device, dist.is_distributed())
    optimizer = build_optimizer(cfg, encoder_q, device)
    wrapped = encoder_q  # compile=true compiles the whole step (maskco.step.Step), this module inside it
    if dist.is_distributed():
        wrapped = torch.nn.parallel.DistributedDataParallel(encoder_q,
                                                            device_ids=[device] if device.type == "cuda" else None)
    precision_dtype = dist.amp_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision_dtype == torch.float16)
    model = Model(encoder_q=wrapped, encoder_k=encoder_k, ema=KeyEncoderEMA(encoder_k, encoder_q), optimizer=optimizer,
                  scaler=scaler, queue=build_queue(cfg, device), device=device, amp_dtype=precision_dtype)
    spec = MethodSpec.from_config(cfg, shuffle_bn=cfg.key_bn == "shuffle")
    return Run(model=model, schedule=Schedule.from_config(cfg, info.world_size, steps_per_epoch),
               step=step.Step(model, spec, seed=cfg.seed, rank=info.rank, compile=cfg.compile, mode=cfg.compile_mode,
                              backend=cfg.compile_backend),
               prefetch=step.use_prefetch(cfg.prefetch, cfg.backend, device))
