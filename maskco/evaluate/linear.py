"""``python -m maskco.evaluate.linear``: linear classification on a frozen backbone (DESIGN 4.8).

Two protocols:

- ``multilayer`` [paper]: OpenSelfSup's ``configs/benchmarks/linear_classification/imagenet/r50_multihead.py``,
  the config the paper cites. conv1 and res2..res5 average-pooled to about 9k values each
  (``maskco.evaluate.features``); per stage ``BatchNorm2d(C, affine=False, momentum=0.1)`` on the pooled
  map, flatten, ``Linear`` (its ``MultiClsHead``), all trained together (the loss is the sum of the five
  cross-entropies, so each head gets its own gradient). Training views: random-resized crop (scale
  0.08-1) + flip, then ColorJitter(0.4, 0.4, 0.4, hue 0) + PCA lighting noise (``linear_augment``). SGD
  with Nesterov momentum 0.9, weight decay 1e-4 on every head parameter, 90 epochs, lr / 10 at epochs
  30 and 60. The base lr is the paper's 0.1 (its supplementary); the config file says 0.01.
  docs/transfer.md lists every point with its source and each difference from the config.
- ``lastlayer`` (MoCo's ``main_lincls.py``): res5 global-average-pooled (2048-d), one ``Linear`` without
  BatchNorm, crop + flip only, plain momentum. Its defaults are MoCo's: lr 30, weight decay 0, 100
  epochs, lr / 10 at 60 and 80.

Every value is a flag; the resolved settings are the first log line. ``--batch-size`` is the *global*
batch (256, as in both papers), split evenly over the ranks, so results do not depend on the GPU count;
the learning rate is not rescaled. Validation views: resize to S/0.875 and centre-crop S (the torch
backend's ``eval_mode``), normalisation only. The backbone runs in eval mode
under ``no_grad``: only the heads train. Under torchrun the heads are DDP-wrapped, their BatchNorm is
synchronised on GPUs (so per-GPU batches of 32 do not make the statistics noisier than the protocol's
256), and the validation counts are summed over ranks. The heads checkpoint to ``out_dir/linear_last.pt`` after
every epoch with the identity of what they evaluate (the backbone's SHA-256, the splits, the protocol settings:
:func:`identity`); a rerun resumes from it only when that matches, and refuses otherwise (``--resume none``
starts over). The default ``out_dir`` is one per checkpoint and protocol. Logs are JSON lines.
"""
from __future__ import annotations

from maskco import tool_args
from maskco.runlog import OutDirError

if __name__ == "__main__":  # the flags first, then torch: --help and a bad flag answer at once (tool_args)
    tool_args.run_as_main("maskco.evaluate.linear", tool_args.linear_args, (ValueError, OutDirError))

import argparse
import dataclasses
import json
import os
import time

import torch
from torch import nn

import pipelines
from maskco import checkpoint, dist
from maskco.dist import resolve_precision
from maskco.evaluate.features import MultiLayerFeatures, source_classes
from maskco.evaluate.linear_augment import COLOR_JITTER, LIGHTING_STD, TrainAugment
from maskco.evaluate.linear_checkpoint import FORMAT, LAST, default_out_dir, identity, resume_path, resume_state
from maskco.evaluate.linear_heads import (LinearHeads, evaluate, flat_accuracies, make_optimizer, step_lr,
                                          train_epoch)
from maskco.evaluate.linear_heads import topk_correct  # noqa: F401  (re-exported: linear.topk_correct)
from maskco.export import backbone_from_args
from maskco.model import unwrap
from maskco.runlog import RunLog, git_revision


def class_count(args: argparse.Namespace) -> int:
    """Classes of the train split; the val split must have the same ones. Unlabelled sources -> ValueError."""
    train, val = source_classes(args.train, "--train"), source_classes(args.val, "--val")
    if train is not None and val is not None and train != val:
        raise ValueError(f"--train has classes {train[:5]}... ({len(train)}), --val {val[:5]}... ({len(val)}): "
                         "they must be the same classes")
    found = len(train) if train is not None else (len(val) if val is not None else None)
    if args.num_classes is not None and found is not None and args.num_classes != found:
        raise ValueError(f"--num-classes {args.num_classes}, but --train has {found} classes")
    if found is None and args.num_classes is None:
        raise ValueError(f"cannot list the classes of {args.train}; pass --num-classes")
    return found if found is not None else args.num_classes


@dataclasses.dataclass
class Probe:
    """What trains on the frozen features: the heads (DDP-wrapped under torchrun), their optimiser, and the
    photometric part of the training views (None: normalisation only). shapes: per-stage feature shape."""
    features: MultiLayerFeatures
    heads: nn.Module
    optimizer: torch.optim.SGD
    augment: TrainAugment | None
    shapes: dict[str, list[int]]
    num_classes: int


def build_loaders(args: argparse.Namespace, info: dist.DistInfo) -> tuple:
    """Train (random-resized crop + flip) and validation (resize + centre crop) loaders of this rank's
    shard, each rank taking ``batch_size / world_size`` images per step (main checked it divides)."""
    common = dict(image_size=args.image_size, device=info.device, rank=info.rank, world_size=info.world_size,
                  seed=args.seed, workers=args.workers)
    per_rank = args.batch_size // info.world_size
    train_loader = pipelines.build_loader(args.backend, args.train, batch_size=per_rank,
                                          crop_scale=(0.08, 1.0), **common)
    val_loader = pipelines.build_loader(args.backend, args.val, batch_size=per_rank, eval_mode=True, **common)
    return train_loader, val_loader


def build_probe(args: argparse.Namespace, info: dist.DistInfo, precision: str, num_classes: int) -> Probe:
    """The frozen backbone's features and the trainable heads on ``info.device``, with SGD and augmentation."""
    device = info.device
    features = MultiLayerFeatures(backbone_from_args(args).to(device), args.protocol, args.pooling, precision)
    if device.type == "cuda":
        features.backbone.to(memory_format=torch.channels_last)
    shapes = {stage: list(shape) for stage, shape in features.shapes(args.image_size).items()}
    heads = LinearHeads(shapes, num_classes, batchnorm=args.protocol == "multilayer").to(device)
    if dist.is_distributed() and device.type == "cuda":  # torch's SyncBatchNorm runs on GPUs only
        heads = nn.SyncBatchNorm.convert_sync_batchnorm(heads)
    if dist.is_distributed():
        heads = nn.parallel.DistributedDataParallel(heads, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(heads, args.lr, args.momentum, args.weight_decay, args.nesterov)
    augment = None  # photometric part of the training views, on the device (the loader cropped and flipped)
    if args.color_jitter or args.lighting:
        augment = TrainAugment(device, COLOR_JITTER if args.color_jitter else None,
                               LIGHTING_STD if args.lighting else 0.0, args.seed, info.rank)
    return Probe(features, heads, optimizer, augment, shapes, num_classes)


def resume(args: argparse.Namespace, probe: Probe, ident: dict, log: RunLog) -> int:
    """Load the heads and optimiser ``--resume`` names (checked: :func:`resume_state`) -> the epoch to start at."""
    path = resume_path(args.resume, args.out_dir)
    if not path:
        return 0
    state = resume_state(path, probe.num_classes, probe.shapes, args.protocol, ident)
    unwrap(probe.heads).load_state_dict(state["heads"])
    probe.optimizer.load_state_dict(state["optimizer"])
    log.write({"resumed": path, "epoch": state["epoch"]})
    return state["epoch"]


def fit(args: argparse.Namespace, probe: Probe, train_loader, val_loader, info: dist.DistInfo, start: int,
        log: RunLog, ident: dict) -> dict:
    """Epochs ``start`` .. ``args.epochs``: lr of the epoch, train, validate (every ``eval_every`` and after
    the last), one log line, the heads to ``out_dir/linear_last.pt`` (rank 0). -> the last validation."""
    device, num_classes, result = info.device, probe.num_classes, {}
    for epoch in range(start, args.epochs):
        lr = step_lr(epoch, args.lr, args.milestones)
        for group in probe.optimizer.param_groups:
            group["lr"] = lr
        train_loader.set_epoch(epoch)
        if probe.augment is not None:
            probe.augment.set_epoch(epoch)
        began = time.time()
        losses = train_epoch(probe.features, probe.heads, train_loader, probe.optimizer, device, num_classes,
                             args.log_every, lambda record: log.write({"epoch": epoch + 1, **record}), probe.augment)
        record = {"epoch": epoch + 1, "lr": lr, "seconds": round(time.time() - began, 1),
                  **{f"loss_{stage}": value for stage, value in losses.items()}}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            result = evaluate(probe.features, probe.heads, val_loader, device, num_classes)
            record.update(flat_accuracies(result))
        log.write(record)
        if info.rank == 0:
            checkpoint.save_atomic({"format": FORMAT, "epoch": epoch + 1, "protocol": args.protocol,
                                    "shapes": probe.shapes, "num_classes": num_classes,
                                    "heads": unwrap(probe.heads).state_dict(),
                                    "optimizer": probe.optimizer.state_dict(), "args": vars(args),
                                    "identity": ident}, os.path.join(args.out_dir, LAST))
    if not result:  # resumed after the last epoch: validate the finished heads once more
        result = evaluate(probe.features, probe.heads, val_loader, device, num_classes)
        log.write({"epoch": start, **flat_accuracies(result)})
    return result


def write_results(args: argparse.Namespace, ident: dict, result: dict) -> None:
    """``out_dir/results.json``: what was evaluated (the backbone, protocol, epochs, identity) and the accuracies."""
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"checkpoint": args.checkpoint or f"random init ({args.arch})", "protocol": args.protocol,
                   "epochs": args.epochs, "identity": ident, **result}, handle, indent=1)


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (``tool_args.linear_args``) and :func:`run`: the probe's last validation."""
    return run(tool_args.linear_args(argv))


def run(args: argparse.Namespace) -> dict:
    """Train and validate the probe ``args`` describe (parsed by ``tool_args.linear_args``)."""
    ident = identity(args)
    args.out_dir = args.out_dir or default_out_dir(args, ident)
    # ---- distributed + device
    info = dist.init_distributed(None if args.device == "auto" else args.device)
    if args.batch_size % info.world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global) must be divisible by the {info.world_size} ranks")
    precision = resolve_precision(args.precision, info.device)
    torch.manual_seed(args.seed)  # same heads (and random backbone) on every rank
    log = RunLog(args.out_dir, enabled=info.rank == 0)
    log.write({"config": {**vars(args), "precision": precision}, "git": git_revision(),
               "world_size": info.world_size, "device": str(info.device), "torch": torch.__version__})

    # ---- data
    num_classes = class_count(args)
    train_loader, val_loader = build_loaders(args, info)

    # ---- model: frozen backbone, trainable heads
    probe = build_probe(args, info, precision, num_classes)

    # ---- resume, then train
    start = resume(args, probe, ident, log)
    log.write({"dims": probe.features.dims(args.image_size), "num_classes": num_classes,
               "steps_per_epoch": len(train_loader), "val_steps": len(val_loader), "start_epoch": start})
    result = fit(args, probe, train_loader, val_loader, info, start, log, ident)

    # ---- report
    if info.rank == 0:
        write_results(args, ident, result)
    log.close()
    for loader in (train_loader, val_loader):
        loader.close()
    del probe  # the DDP-wrapped heads, before the process group goes
    dist.shutdown()
    return result

