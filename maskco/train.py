"""``python -m maskco.train [preset.yaml ...] [--key=value ...]``: MaskCo pretraining.

One code path for one CPU process, one GPU, or torchrun over many GPUs and nodes. Resumes
automatically from ``out_dir/checkpoint_last.pt`` (``--resume=none`` to start over).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch

import pipelines
from pipelines import DataError
from maskco import checkpoint, cli as grammar, dist
from maskco.build import Run, amp_dtype, build_run, resolve_data
from maskco.config import Config, ConfigError, build_config, global_batch, method_label, peak_lr
from maskco.engine import LoopState, train
from maskco.export import TORCHVISION_FILE, export_torchvision
from maskco.model import unwrap
from maskco.runlog import RunLog, git_revision, signal_name, train_lines


SUMMARY = """MaskCo pretraining: presets (later ones win), then config keys (later ones win). Resumes from
out_dir/checkpoint_last.pt when there is one (--resume=none starts over). On a terminal: a progress bar and
short human lines; every record goes to out_dir/log.jsonl as JSON (and to stdout when it is not a terminal,
or with --json). Example: python -m maskco.train cpu_demo --epochs=1"""


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
    check_precision(state, run.scaler, path)
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


def check_precision(state: dict, scaler, path: str) -> None:
    """fp16 keeps a GradScaler state, the other precisions none: switching in or out of fp16 on resume
    is refused with the way out, instead of GradScaler's traceback."""
    if bool(state.get("scaler")) != scaler.is_enabled():
        stored = state.get("config", {}).get("precision")
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was trained with precision={stored} and this run {'is' if scaler.is_enabled() else 'is not'}"
            f" fp16 (the GradScaler state cannot carry over); keep --precision={stored}, or start over with "
            "--resume=none or another --out_dir")


USAGE = ("usage: python -m maskco.train [PRESET ...] [--key=value | --key value ...] [--json]\n"
         "  e.g. python -m maskco.train cpu_demo       (the CPU demo; --help lists presets and every key)\n"
         "  with no arguments nothing runs: the bare defaults are a ResNet-50, 200-epoch ImageNet run")


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        parsed = grammar.parse_config_args(args, {"json": False})
        if parsed.help:
            print(grammar.usage_text("python -m maskco.train", SUMMARY,
                                     "  --json        JSON records on stdout also on a terminal", " [--json]"))
            return 0
        cfg, out_dir_note = grammar.derive_out_dir(build_config(parsed.config), parsed)
        grammar.check_device(cfg.device)
    except ConfigError as error:
        return grammar.fail("maskco.train", error)
    # ---- distributed + device
    info = dist.init_distributed(None if cfg.device == "auto" else cfg.device)
    device, world_size = info.device, info.world_size
    torch.manual_seed(cfg.seed + info.rank)  # per-rank host randomness; the models are seeded in maskco.build
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = RunLog(cfg.out_dir, enabled=info.rank == 0, tensorboard=cfg.tensorboard, lines=train_lines,
                 json_stdout=True if parsed.options["json"] else None, hold=True)
    log.write({"config": cfg.to_dict(), "git": git_revision(), "world_size": world_size, "device": str(device),
               "torch": torch.__version__, "global_batch": global_batch(cfg, world_size),
               "peak_lr": peak_lr(cfg, world_size), "presets": parsed.presets, "method": method_label(cfg),
               "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(cfg, device)],
               "out_dir_note": out_dir_note})
    if cfg.backend == "dali" and device.type != "cuda":
        log.write({"warning": "backend dali without a GPU: DALI decodes on the CPU here (as --backend=dali-cpu)"})

    # ---- data
    loader = pipelines.build_loader(
        cfg.backend, resolve_data(cfg, info.local_rank), batch_size=cfg.batch_size, image_size=cfg.image_size,
        device=device, rank=info.rank, world_size=world_size, seed=cfg.seed,
        workers=None if cfg.workers < 0 else cfg.workers, crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio,
        flip_prob=cfg.flip_prob, strict_data=cfg.strict_data,
    )
    steps_per_epoch = len(loader)

    # ---- model, optimiser: identical on every rank (maskco.build)
    run = build_run(cfg, info, steps_per_epoch)
    total_steps, stop_step = run.total_steps, run.stop_step

    # ---- resume, then train
    state = LoopState()
    resume = checkpoint.latest(cfg.out_dir) if cfg.resume == "auto" else (None if cfg.resume == "none" else cfg.resume)
    if resume:
        state = restore(cfg, run, resume, steps_per_epoch, log)
    last = os.path.join(cfg.out_dir, checkpoint.LAST)
    if state.step >= stop_step:  # a finished run: say so and touch nothing (no log lines, no new exports)
        log.discard()
        log.show({"already_finished": state.step, "out_dir": cfg.out_dir, "checkpoint": resume})
        log.close()
        run.encoder_q = run.optimizer = None  # as below: DDP goes before the process group
        del run
        dist.shutdown()
        return 0
    log.write({"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "stop_step": stop_step,
               "start_step": state.step, "resumed_from": resume, "data": cfg.data, "backend": cfg.backend,
               "images": image_count(loader)})

    def save(loop_state: LoopState) -> None:
        if info.rank == 0:
            checkpoint.save_atomic(checkpoint_state(cfg, run, loop_state, steps_per_epoch), last)

    def epoch_end(loop_state: LoopState) -> None:
        save(loop_state)
        if cfg.knn_every and loop_state.epoch % cfg.knn_every == 0:
            log.write({"epoch": loop_state.epoch, "step": loop_state.step, **knn(cfg, run, info)})

    log.start_progress(stop_step, state.step)
    began = time.perf_counter()
    state = train(run, loader, state, log.write, save, epoch_end)
    done = state.step >= stop_step and not state.stop_signal
    exported = None
    if done and cfg.export and info.rank == 0:
        exported = os.path.join(cfg.out_dir, TORCHVISION_FILE)
        export_torchvision(unwrap(run.encoder_q).state_dict(), exported)
        log.write({"exported": exported, "arch": cfg.arch})
    if state.stop_signal:
        log.write({"interrupted": signal_name(state.stop_signal), "step": state.step,
                   "checkpoint": last, "hint": "run the same command again to resume"})
    if done:
        losses = [loss for _, loss in state.history]
        log.write({"finished": True, "step": state.step, "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - began, 1),
                   "checkpoint": last, "exported": exported})
    log.close()
    run.encoder_q = run.optimizer = None  # drop DDP and the optimiser before the process group goes
    del run
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


def image_count(loader) -> Optional[int]:
    """Images in the data source, where the backend's loader says (None where it does not)."""
    images = getattr(loader, "images", None)
    if images is not None:
        return len(images)
    info = getattr(loader, "info", None)
    return getattr(info, "num_samples", None)


def cli() -> int:
    """``main`` for the command line: a bad input is one clear line on stderr, not a traceback."""
    try:
        return main()
    except (DataError, checkpoint.CheckpointError, ConfigError, ImportError) as error:
        return grammar.fail("maskco.train", error)


if __name__ == "__main__":
    sys.exit(cli())
