"""The trainer's log records: their shape, and how a person reads them on a terminal (:func:`lines`).

Every record goes to ``out_dir/log.jsonl`` as JSON (``maskco.runlog.RunLog``); the builders here make
the ones whose fields several places read (the header, the start, the summary, the interruption), and
:func:`lines` renders each kind of record as one or a few short lines.
"""
from __future__ import annotations

import torch

from maskco import dist
from maskco.config import Config, global_batch, method_label, peak_lr
from maskco.runlog import git_revision, signal_name


def header(cfg: Config, presets: list, world_size: int, device, out_dir_note: str) -> dict:
    """The first record: the whole config and what it became on this machine."""
    return {"config": cfg.to_dict(), "git": git_revision(), "world_size": world_size, "device": str(device),
            "torch": torch.__version__, "global_batch": global_batch(cfg, world_size),
            "peak_lr": peak_lr(cfg, world_size), "presets": presets, "method": method_label(cfg),
            "precision": dist.resolve_precision(cfg.precision, device), "out_dir_note": out_dir_note}


def start(cfg: Config, steps_per_epoch: int, schedule, start_step: int, resumed_from, images) -> dict:
    """Training starts (fresh or resumed): the data and the steps ahead."""
    return {"steps_per_epoch": steps_per_epoch, "total_steps": schedule.total_steps,
            "stop_step": schedule.stop_step, "start_step": start_step, "resumed_from": resumed_from,
            "data": cfg.data, "backend": cfg.backend, "images": images}


def interrupted(state, checkpoint) -> dict:
    """A stop signal ended the run at a step boundary, with a checkpoint of that step."""
    return {"interrupted": signal_name(state.stop_signal), "asked_at_step": state.stop_asked_at,
            "step": state.step, "checkpoint": checkpoint, "hint": "run the same command again to resume"}


def finished(state, seconds: float, checkpoint, exported) -> dict:
    """The summary of a run that reached its last step."""
    losses = [loss for _, loss in state.history]
    return {"finished": True, "step": state.step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "seconds": round(seconds, 1),
            "checkpoint": checkpoint, "exported": exported}


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _loss(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def lines(record: dict, total_steps: int = 0) -> str | None:
    """The trainer's records as a person reads them on a terminal (None: nothing to show)."""
    r = record
    if "config" in r:
        c = r["config"]
        presets = ", ".join(r.get("presets") or []) or "defaults"
        return "\n".join([
            f"run       {presets}: {r.get('method', c['method'])}, {c['arch']}, {c['image_size']} px, "
            f"batch {c['batch_size']} x {r.get('world_size', 1)} process(es), {c['epochs']} epochs",
            f"device    {r.get('device')} ({r.get('precision', c['precision'])}), world size {r.get('world_size', 1)}",
            f"out_dir   {c['out_dir']}" + (f"  ({r['out_dir_note']})" if r.get("out_dir_note") else "")])
    if "steps_per_epoch" in r:
        images = f"{r['images']} images, " if r.get("images") is not None else ""
        start = (f"resumed at step {r['start_step']} from {r['resumed_from']}" if r.get("resumed_from")
                 else "fresh start")
        return "\n".join([
            f"data      {r.get('data')}: {images}backend {r.get('backend')}, {r['steps_per_epoch']} steps per epoch",
            f"start     {start}; training to step {r['stop_step']} (of {r['total_steps']})"])
    if "resumed_from" in r:
        return None  # said by the start line
    if "warning" in r:
        return f"warning: {r['warning']}"
    if "loss" in r and "step" in r:
        line = (f"step {r['step']}/{total_steps or '?'}  loss {r['loss']:.2f}  img/s {r.get('img_per_s', 0):.0f}  "
                f"data wait {100 * r.get('data_wait', 0):.0f} %")
        return line + (f"  skipped images {r['skipped_images']}" if r.get("skipped_images") else "")
    if "knn_top1" in r:
        return f"epoch {r.get('epoch')}  kNN top-1 {r['knn_top1']:.1f} %"
    if r.get("finished"):
        where = f"checkpoint {r.get('checkpoint')}" + (f", backbone {r['exported']}" if r.get("exported") else "")
        return (f"finished  {r['step']} steps in {_duration(r.get('seconds', 0))}; loss {_loss(r.get('first_loss'))}"
                f" -> {_loss(r.get('last_loss'))}; {where}")
    if "exported" in r:
        return None  # said by the summary
    if "interrupted" in r:
        asked = f" (asked at step {r['asked_at_step']})" if r.get("asked_at_step") else ""
        return (f"interrupted by {r['interrupted']}: stopped at step {r.get('step')}{asked}; checkpoint "
                f"{r.get('checkpoint')}; {r.get('hint', '')}").rstrip("; ")
    if "checkpoint" in r and "step" in r:
        return f"saved     step {r['step']}: {r['checkpoint']}"
    if "error" in r:
        return None  # the one-line error on stderr says it
    if "already_finished" in r:
        return (f"already finished at step {r['already_finished']} ({r.get('out_dir')}); nothing to do: "
                "use --resume=none or another --out_dir")
    return "  ".join(f"{key} {value}" for key, value in r.items() if key != "time")[:300] or None
