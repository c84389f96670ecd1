"""The trainer behind ``python -m maskco.train`` (the entry point, ``maskco.train``, parses and answers
``--help`` without loading torch): :class:`Trainer` assembles one invocation (process group, log,
checkpoint store, loader, run), resumes it, runs the loop and says how it ended.
"""
from __future__ import annotations

import datetime
import sys
import time
import traceback
from typing import Optional

import torch

import pipelines
from pipelines.sample_data import resolve_source
from maskco import checkpoint, cli as grammar, dist, trainlog
from maskco.build import Run, build_run
from maskco.config import Config, ConfigError
from maskco.engine import Diverged, LoopState, train
from maskco.export import export_backbone
from maskco.model import unwrap
from maskco.runlog import RunLog, git_revision
from maskco.train import EXIT_DIVERGED, given_up, known_errors

def checkpoint_state(cfg: Config, run: Run, state: LoopState, steps_per_epoch: int, data: dict) -> dict:
    model = run.model
    return {
        "format": checkpoint.FORMAT, "config": cfg.to_dict(), "git": git_revision(),
        "epoch": state.epoch, "step": state.step, "steps_per_epoch": steps_per_epoch,
        "world_size": dist.get_world_size(), "batch_size": cfg.batch_size, "data": data,
        "skipped_images": state.skipped_images,
        "encoder_q": unwrap(model.encoder_q).state_dict(), "encoder_k": model.encoder_k.state_dict(),
        "optimizer": model.optimizer.state_dict(), "scaler": model.scaler.state_dict(),
        "queue": model.queue.state_dict() if model.queue is not None else None,
        "rng": checkpoint.rng_state(),
    }


def find_resume(cfg: Config, store: checkpoint.Store, log: RunLog) -> tuple[Optional[str], Optional[dict]]:
    """The checkpoint to resume from -> (path, state): chosen on rank 0 (the newest that verifies) and the
    same path on every rank; the state is rank 0's, already loaded (None on the other ranks, which load
    the path themselves). A CheckpointError on rank 0 is raised on every rank."""
    path, state, error = None, None, None
    if dist.get_rank() == 0:
        try:
            if cfg.resume == "auto":
                path, state = store.load_latest()
            elif cfg.resume != "none":
                path, state = cfg.resume, checkpoint.load(cfg.resume)
        except checkpoint.CheckpointError as failure:
            error = str(failure)
    path, error = dist.broadcast_object((path, error))
    if error:
        raise checkpoint.CheckpointError(error)
    return path, state


def resume_position(state: dict, path: str, data: dict, global_batch_now: int, steps_per_epoch: int,
                    log: RunLog) -> int:
    """The step to continue at: the stored one, or, when the global batch changed, the step of the new
    run at which exactly the same images of the epoch are done (no image repeated or skipped).

    Refuses (CheckpointError) a checkpoint written on other data or another backend, and a global-batch
    change that cannot continue exactly mid-epoch.
    """
    stored = state.get("data")
    if stored is not None and stored != data:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was written reading other data ({_describe(stored)}); this run reads "
            f"{_describe(data)}: use the same --data and --backend, or --resume=none / another --out_dir")
    step, epoch = state["step"], state["epoch"]
    batch_then = state.get("batch_size", state["config"]["batch_size"]) * state["world_size"]
    if batch_then == global_batch_now:
        return step
    images_done = (step - epoch * state["steps_per_epoch"]) * batch_then  # of epoch `epoch`
    if images_done % global_batch_now:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} stopped {images_done} images into epoch {epoch} with a global batch of "
            f"{batch_then} ({state['world_size']} ranks); a global batch of {global_batch_now} cannot continue "
            f"there without repeating or skipping images: resume with the old world size and batch_size "
            f"until the epoch ends (--max_steps={(epoch + 1) * state['steps_per_epoch']}), then change")
    new_step = epoch * steps_per_epoch + images_done // global_batch_now
    log.write({"warning": f"the global batch changed ({batch_then} -> {global_batch_now}): resuming at step "
                          f"{new_step} (was {step}), {images_done} images into epoch {epoch}; the peak lr follows "
                          f"the linear scaling rule and changes by {global_batch_now / batch_then:g}x"})
    return new_step


def _describe(data: dict) -> str:
    return f"{data.get('images')} images, listing {data.get('listing_sha256')}, backend {data.get('backend')}"


def restore(cfg: Config, run: Run, path: str, state: Optional[dict], steps_per_epoch: int, data: dict,
            log: RunLog) -> LoopState:
    """Load ``path`` (or rank 0's ``state``, already loaded by find_resume) into ``run``; every check
    comes before anything is loaded."""
    if state is None:
        state = checkpoint.load(path, verify=False)  # verified on rank 0 by find_resume
    model = run.model
    checkpoint.check_compatible(state, cfg.to_dict(), path)
    check_precision(state, model.scaler, path)
    step = resume_position(state, path, data, run.schedule.global_batch, steps_per_epoch, log)
    unwrap(model.encoder_q).load_state_dict(state["encoder_q"])
    model.encoder_k.load_state_dict(state["encoder_k"])
    model.optimizer.load_state_dict(state["optimizer"])
    model.scaler.load_state_dict(state["scaler"])
    if model.queue is not None and state.get("queue") is not None:
        model.queue.load_state_dict(state["queue"])
    checkpoint.set_rng_state(state["rng"])
    log.write({"resumed_from": path, "epoch": state["epoch"], "step": step})
    return LoopState(epoch=state["epoch"], step=step, skipped_images=state.get("skipped_images", 0))


def weights_finite(module: torch.nn.Module) -> bool:
    """Every parameter finite (one reduction, one sync: called before every checkpoint; the export
    follows the last one)."""
    norms = torch._foreach_norm([p.detach() for p in module.parameters()])
    return bool(torch.stack(norms).isfinite().all())


def check_precision(state: dict, scaler, path: str) -> None:
    """fp16 keeps a GradScaler state, the other precisions none: switching in or out of fp16 on resume
    is refused with the way out, instead of GradScaler's traceback."""
    if bool(state.get("scaler")) != scaler.is_enabled():
        stored = state.get("config", {}).get("precision")
        this_run = "is" if scaler.is_enabled() else "is not"
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was trained with precision={stored} and this run {this_run}"
            f" fp16 (the GradScaler state cannot carry over); keep --precision={stored}, or start over with "
            "--resume=none or another --out_dir")


class Trainer:
    """One invocation of the trainer, assembled: the process group, the log, the checkpoint store, the
    loader and the run (``maskco.build``); then resume, the loop with its checkpoint and epoch-end
    callbacks, and the records that say how it ended."""

    def __init__(self, cfg: Config, parsed, out_dir_note: str):
        self.cfg = cfg
        self.info = info = dist.init_distributed(None if cfg.device == "auto" else cfg.device,
                                                 timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        torch.manual_seed(cfg.seed + info.rank)  # per-rank host randomness; the models are seeded in maskco.build
        self.log = RunLog(cfg.out_dir, enabled=info.rank == 0, tensorboard=cfg.tensorboard, lines=trainlog.lines,
                          json_stdout=True if parsed.options["json"] else None, hold=True)
        self.log.write(trainlog.header(cfg, parsed.presets, info.world_size, info.device, out_dir_note))
        if cfg.backend == "dali" and info.device.type != "cuda":
            self.warn("backend dali without a GPU: DALI decodes on the CPU here (as --backend=dali-cpu)")
        self.store = checkpoint.Store(cfg.out_dir, keep=cfg.keep_checkpoints, warn=self.warn)
        if info.rank == 0:
            for path in self.store.remove_stale():
                self.warn(f"removed {path}, a partial checkpoint left by a process that was killed")
        source = resolve_source(cfg.data, cfg.sample_dir, cfg.sample_images, info.local_rank)
        self.loader = pipelines.build_loader(
            cfg.backend, source, batch_size=cfg.batch_size, image_size=cfg.image_size, device=info.device,
            rank=info.rank, world_size=info.world_size, seed=cfg.seed, workers=None if cfg.workers < 0 else cfg.workers,
            crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio, flip_prob=cfg.flip_prob,
            strict_data=cfg.strict_data, timeout=cfg.data_timeout)
        self.steps_per_epoch = len(self.loader)
        self.data = {"backend": cfg.backend, **self.loader.fingerprint()}
        self.run = build_run(cfg, info, self.steps_per_epoch)  # identical on every rank

    def warn(self, text: str) -> None:
        self.log.write({"warning": text})

    def resume(self) -> tuple[LoopState, Optional[str]]:
        """-> (where training continues, the checkpoint it continues from or None)."""
        path, stored = find_resume(self.cfg, self.store, self.log)
        if not path:
            return LoopState(), None
        return restore(self.cfg, self.run, path, stored, self.steps_per_epoch, self.data, self.log), path

    def train(self, state: LoopState, resumed_from: Optional[str]) -> int:
        """The loop from ``state`` -> the exit code; a crash goes into the log with its step, then up."""
        cfg, log = self.cfg, self.log
        log.write(trainlog.start(cfg, self.steps_per_epoch, self.run.schedule, state.step, resumed_from,
                                 self.data["images"]))
        log.start_progress(self.run.schedule.stop_step, state.step)
        began, first_step = time.perf_counter(), state.step
        try:
            state = train(self.run, self.loader, state, log.write, self.save, self.epoch_end)
        except Diverged as error:
            log.stop_progress()  # before the error line (the finally below comes after it)
            message = (f"{error}; nothing from it was saved, the last good checkpoint is "
                       f"{checkpoint.latest(cfg.out_dir) or 'none'} (try a lower base_lr, or bf16/fp32 instead of "
                       "fp16)")
            log.write({"diverged": True, "error": message})
            if self.info.rank == 0:
                print(f"maskco.train: error: {message}", file=sys.stderr)
            self.finish()
            return EXIT_DIVERGED
        except BaseException as error:  # a crash, or a second Ctrl-C: into the log with its step, then up to cli()
            if state.step > first_step or not isinstance(error, known_errors()):  # bad input at once: as if at start
                log.record_failure(failure_record(error, state.step, self.info.rank))
            error.during_training = True  # this rank's own: said by this rank (cli)
            raise
        finally:
            log.stop_progress()  # its last state drawn before the lines that say how the run ended
            self.loader.close()  # its workers end now, whatever happened (pipelines.close_all is the backstop)
        return self.report(state, time.perf_counter() - began)

    def save(self, state: LoopState) -> None:
        if not weights_finite(self.run.model.encoder_q):  # on every rank: DDP keeps them equal, and all must stop
            raise Diverged(f"the weights are not finite after step {state.step}: training diverged")
        if self.info.rank == 0:
            path = self.store.save(checkpoint_state(self.cfg, self.run, state, self.steps_per_epoch, self.data),
                                   state.step)
            self.log.write({"checkpoint": path, "step": state.step})

    def epoch_end(self, state: LoopState) -> None:
        self.save(state)
        if self.cfg.knn_every and state.epoch % self.cfg.knn_every == 0:
            self.log.write({"epoch": state.epoch, "step": state.step, **knn(self.cfg, self.run, self.info)})

    def report(self, state: LoopState, seconds: float) -> int:
        """The export and the records of how the loop ended -> the exit code (128 + a stop signal)."""
        cfg, log = self.cfg, self.log
        done = state.step >= self.run.schedule.stop_step and not state.stop_signal
        exported = None
        if done and cfg.export and self.info.rank == 0:
            # torchvision's file where torchvision can hold the backbone, else backbone.pth with its shape
            exported = export_backbone(unwrap(self.run.model.encoder_q).state_dict(), cfg.out_dir, cfg.arch,
                                       cfg.stem, cfg.width)
            log.write({"exported": exported, "arch": cfg.arch, "stem": cfg.stem, "width": cfg.width})
        if state.stop_signal:
            log.write(trainlog.interrupted(state, self.store.last))
        if done:
            log.write(trainlog.finished(state, seconds, self.store.last, exported))
        self.finish()
        return 128 + int(state.stop_signal) if state.stop_signal else 0

    def finish(self) -> None:
        self.log.close()
        self.run.model.release()  # drop DDP and the optimiser before the process group goes
        dist.shutdown()


def failure_record(error: BaseException, step: int, rank: int) -> dict:
    """The log record of a run that ended on an exception after ``step`` steps: one line for a known
    error type, the traceback for anything else."""
    if given_up(error):  # a second Ctrl-C, or a library's error on its way out
        return {"interrupted": "SIGINT", "step": step, "rank": rank,
                "hint": "a second Ctrl-C gives up at once: run the same command again to resume"}
    text = grammar.one_line(error) if isinstance(error, known_errors()) else \
        "".join(traceback.format_exception(error)).rstrip()
    return {"error": text, "type": type(error).__name__, "step": step, "rank": rank}


def knn(cfg: Config, run: Run, info) -> dict:
    """The kNN monitor on the query backbone (top-1 on knn_val with knn_train as the memory bank)."""
    from maskco.evaluate.knn import knn_monitor

    if not (cfg.knn_train and cfg.knn_val):
        raise ConfigError("knn_every needs knn_train and knn_val (labelled splits)")
    result = knn_monitor(unwrap(run.model.encoder_q).backbone, cfg.knn_train, cfg.knn_val, image_size=cfg.image_size,
                         device=run.model.device, batch_size=cfg.batch_size,
                         workers=None if cfg.workers < 0 else cfg.workers, rank=info.rank, world_size=info.world_size)
    return {f"knn_{k}": v for k, v in result.items()}
