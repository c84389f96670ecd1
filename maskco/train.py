"""``python -m maskco.train [preset.yaml ...] [--key=value ...]``: MaskCo pretraining.

One code path for one CPU process, one GPU, or torchrun over many GPUs and nodes. Resumes
automatically from ``out_dir/checkpoint_last.pt`` (``--resume=none`` to start over).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import pipelines
from pipelines import DataError
from maskco import checkpoint, dist
from maskco.config import Config, ConfigError, build_config, global_batch, peak_lr
from maskco.engine import LoopState, train
from maskco.loss import KeyQueue
from maskco.method import MethodSpec
from maskco.export import TORCHVISION_FILE, export_torchvision
from maskco.model import Encoder, build_key_encoder, param_groups, unwrap
from maskco.runlog import RunLog, git_revision


@dataclass
class Run:
    """The assembled pieces the loop needs (see maskco.engine.train)."""

    encoder_q: torch.nn.Module
    encoder_k: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    spec: MethodSpec
    queue: Optional[KeyQueue]
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    rank: int
    seed: int
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


def amp_dtype(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast by default on GPU, fp32 on CPU (CPU autocast is slower than fp32 for convs)."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def resolve_data(cfg: Config, local_rank: int) -> str:
    """The data path; "sample" builds the sample set once per node (local rank 0) and reuses it."""
    if cfg.data != "sample":
        return cfg.data
    from pipelines.sample_data import make_sample_data

    if local_rank == 0:
        make_sample_data(cfg.sample_dir, num_images=cfg.sample_images, seed=0)
    if dist.is_distributed():
        torch.distributed.barrier()
    return cfg.sample_dir


def build_encoders(cfg: Config, device: torch.device, distributed: bool):
    encoder_q = Encoder(cfg.arch, dilated=cfg.dilated, mph=cfg.mph, mph_width=cfg.mph_width,
                        mph_layers=cfg.mph_layers, mph_heads=cfg.mph_heads, head_hidden=cfg.head_hidden,
                        head_dim=cfg.head_dim, roi_output_size=cfg.roi_output_size,
                        roi_sampling_ratio=cfg.roi_sampling_ratio, roi_fused=cfg.roi_fused,
                        roi_centering=cfg.roi_centering)
    if cfg.key_bn == "sync" and distributed:
        if device.type != "cuda":
            raise ConfigError("key_bn=sync needs CUDA (SyncBatchNorm runs only on GPUs); use key_bn=shuffle")
        encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(encoder_q)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    encoder_q = encoder_q.to(device, memory_format=memory_format)
    encoder_k = build_key_encoder(encoder_q)  # outside DDP: never re-broadcast
    return encoder_q, encoder_k


def build_optimizer(cfg: Config, encoder_q: torch.nn.Module, device: torch.device) -> torch.optim.SGD:
    # fused SGD (one kernel for all parameters) on CUDA; the foreach path elsewhere
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(param_groups(encoder_q, cfg.weight_decay, cfg.weight_decay_all), lr=0.0, momentum=cfg.sgd_momentum, **fast)


def checkpoint_state(cfg: Config, run: Run, state: LoopState, steps_per_epoch: int) -> dict:
    return {
        "format": checkpoint.FORMAT, "config": cfg.to_dict(), "git": git_revision(),
        "epoch": state.epoch, "step": state.step, "steps_per_epoch": steps_per_epoch,
        "world_size": dist.get_world_size(),
        "encoder_q": unwrap(run.encoder_q).state_dict(), "encoder_k": run.encoder_k.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "queue": run.queue.state_dict() if run.queue is not None else None,
        "rng": checkpoint.rng_state(),
    }


def restore(cfg: Config, run: Run, path: str, steps_per_epoch: int, log: RunLog) -> LoopState:
    state = checkpoint.load(path)
    checkpoint.check_compatible(state, cfg.to_dict(), path)
    unwrap(run.encoder_q).load_state_dict(state["encoder_q"])
    run.encoder_k.load_state_dict(state["encoder_k"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if run.queue is not None and state.get("queue") is not None:
        run.queue.load_state_dict(state["queue"])
    checkpoint.set_rng_state(state["rng"])
    step, epoch = state["step"], state["epoch"]
    if state.get("steps_per_epoch") != steps_per_epoch:
        # another world size or batch: continue at the start of the stored epoch's next full step count
        log.write({"warning": f"steps per epoch changed ({state.get('steps_per_epoch')} -> {steps_per_epoch});"
                              f" resuming at the start of epoch {epoch}"})
        step = epoch * steps_per_epoch
    log.write({"resumed_from": path, "epoch": epoch, "step": step})
    return LoopState(epoch=epoch, step=step)


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = build_config(args)
    except ConfigError as error:
        print(f"maskco.train: {error}", file=sys.stderr)
        return 2
    # ---- distributed + device
    info = dist.init_distributed(None if cfg.device == "auto" else cfg.device)
    device, world_size = info.device, info.world_size
    torch.manual_seed(cfg.seed + info.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = RunLog(cfg.out_dir, enabled=info.rank == 0, tensorboard=cfg.tensorboard)
    log.write({"config": cfg.to_dict(), "git": git_revision(), "world_size": world_size, "device": str(device),
               "torch": torch.__version__, "global_batch": global_batch(cfg, world_size),
               "peak_lr": peak_lr(cfg, world_size)})

    # ---- data
    loader = pipelines.build_loader(
        cfg.backend, resolve_data(cfg, info.local_rank), batch_size=cfg.batch_size, image_size=cfg.image_size,
        device=device, rank=info.rank, world_size=world_size, seed=cfg.seed,
        workers=None if cfg.workers < 0 else cfg.workers, crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio,
        flip_prob=cfg.flip_prob, strict_data=cfg.strict_data,
    )
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch  # the LR / momentum schedules always span all epochs
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    # ---- model, optimiser
    encoder_q, encoder_k = build_encoders(cfg, device, dist.is_distributed())
    optimizer = build_optimizer(cfg, encoder_q, device)
    model = encoder_q
    if cfg.compile:
        model = torch.compile(model)
    if dist.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    precision_dtype = amp_dtype(cfg, device)
    run = Run(
        encoder_q=model, encoder_k=encoder_k, optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=precision_dtype == torch.float16),
        spec=MethodSpec.from_config(cfg, shuffle_bn=cfg.key_bn == "shuffle"),
        queue=KeyQueue(cfg.queue_size, cfg.head_dim, device=device) if cfg.queue_size else None,
        device=device, amp_dtype=precision_dtype, rank=info.rank, seed=cfg.seed, epochs=cfg.epochs,
        total_steps=total_steps, stop_step=stop_step, warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
        peak_lr=peak_lr(cfg, world_size), min_lr=cfg.min_lr, momentum=cfg.momentum,
        momentum_schedule=cfg.momentum_schedule, global_batch=global_batch(cfg, world_size),
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
    )

    # ---- resume, then train
    state = LoopState()
    resume = checkpoint.latest(cfg.out_dir) if cfg.resume == "auto" else (None if cfg.resume == "none" else cfg.resume)
    if resume:
        state = restore(cfg, run, resume, steps_per_epoch, log)
    log.write({"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "stop_step": stop_step,
               "start_step": state.step})
    last = os.path.join(cfg.out_dir, checkpoint.LAST)

    def save(loop_state: LoopState) -> None:
        if info.rank == 0:
            checkpoint.save_atomic(checkpoint_state(cfg, run, loop_state, steps_per_epoch), last)

    def epoch_end(loop_state: LoopState) -> None:
        save(loop_state)
        if cfg.knn_every and loop_state.epoch % cfg.knn_every == 0:
            log.write({"epoch": loop_state.epoch, "step": loop_state.step, **knn(cfg, run, info)})

    log.start_progress(stop_step, state.step)
    state = train(run, loader, state, log.write, save, epoch_end)
    done = state.step >= stop_step and not state.stop_signal
    if done and cfg.export and info.rank == 0:
        path = os.path.join(cfg.out_dir, TORCHVISION_FILE)
        export_torchvision(unwrap(run.encoder_q).state_dict(), path)
        log.write({"exported": path, "arch": cfg.arch})
    if state.stop_signal:
        log.write({"interrupted": int(state.stop_signal), "step": state.step,
                   "checkpoint": last, "hint": "run the same command again to resume"})
    if done:
        losses = [loss for _, loss in state.history]
        log.write({"finished": True, "step": state.step, "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None})
    log.close()
    run.encoder_q = run.optimizer = None  # drop DDP and the optimiser before the process group goes
    del model, optimizer, encoder_q, encoder_k
    dist.shutdown()
    return 128 + int(state.stop_signal) if state.stop_signal else 0


def knn(cfg: Config, run: Run, info) -> dict:
    """The kNN monitor on the query backbone (top-1 on knn_val with knn_train as the memory bank)."""
    from maskco.evaluate.knn import knn_monitor

    if not (cfg.knn_train and cfg.knn_val):
        raise ConfigError("knn_every needs knn_train and knn_val (labelled splits)")
    result = knn_monitor(unwrap(run.encoder_q).backbone, cfg.knn_train, cfg.knn_val, image_size=cfg.image_size,
                         device=run.device, batch_size=cfg.batch_size,
                         workers=None if cfg.workers < 0 else cfg.workers, rank=info.rank, world_size=info.world_size)
    return {f"knn_{k}": v for k, v in result.items()}


def cli() -> int:
    """``main`` for the command line: a bad input is one clear line on stderr, not a traceback."""
    try:
        return main()
    except (DataError, checkpoint.CheckpointError, ConfigError, ImportError) as error:
        print(f"maskco.train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
