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

import argparse
import json
import math
import os
import sys
import time
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

import pipelines
from maskco import checkpoint, cli, dist
from maskco.dist import resolve_precision
from maskco.evaluate.features import (POOLINGS, PROTOCOLS, MultiLayerFeatures, check_labels, images_and_labels,
                                      source_classes)
from maskco.evaluate.linear_augment import COLOR_JITTER, LIGHTING_STD, TrainAugment
from maskco.export import add_backbone_arguments, backbone_from_args, check_backbone_arguments
from maskco.model import unwrap
from maskco.runlog import RunLog, git_revision

FORMAT = "maskco-linear-v2"  # v1: BatchNorm1d over the flattened features (before OpenSelfSup's BatchNorm2d)
LAST = "linear_last.pt"
PROTOCOL_DEFAULTS = {  # multilayer: lr and milestones [paper], the rest OpenSelfSup's r50_multihead.py; lastlayer: MoCo
    "multilayer": {"epochs": 90, "lr": 0.1, "weight_decay": 1e-4, "milestones": [30, 60], "nesterov": True,
                   "color_jitter": True, "lighting": True},
    "lastlayer": {"epochs": 100, "lr": 30.0, "weight_decay": 0.0, "milestones": [60, 80], "nesterov": False,
                  "color_jitter": False, "lighting": False},
}


class LinearHeads(nn.Module):
    """One classifier per stage: ``{stage: [N, *shape]}`` -> ``{stage: [N, num_classes]}`` logits.

    shapes: per-image feature shape per stage, (C, g, g) pooled maps or (C,) vectors (``features.shapes``).
    batchnorm (the multi-layer protocol, OpenSelfSup's MultiClsHead): ``norm`` = BatchNorm2d(C,
    affine=False, momentum=0.1) on the pooled map - statistics per channel over the batch and the g x g
    positions - then ``flatten`` (C, g, g order) and ``fc``. It makes one learning rate fit features of
    very different scales. Without it (lastlayer) the Linear takes the feature as it is. Weights start at
    N(0, 0.01), biases at 0 (MultiClsHead.init_weights; MoCo's main_lincls does the same).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], num_classes: int, batchnorm: bool = True):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.heads = nn.ModuleDict()
        for stage, shape in shapes.items():
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            linear = nn.Linear(math.prod(shape), num_classes)
            nn.init.normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)
            if batchnorm:
                norm = (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(shape[0], momentum=0.1, affine=False)
                self.heads[stage] = nn.Sequential(OrderedDict(norm=norm, flatten=nn.Flatten(), fc=linear))
            else:
                self.heads[stage] = nn.Sequential(nn.Flatten(), linear) if len(shape) > 1 else linear

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {stage: head(features[stage]) for stage, head in self.heads.items()}


def make_optimizer(heads: nn.Module, lr: float, momentum: float, weight_decay: float,
                   nesterov: bool) -> torch.optim.SGD:
    """SGD over every parameter of ``heads``, all decayed: the Linear weights and biases. The norms have no
    parameters (affine=False), so OpenSelfSup's ``norm_decay_mult=0`` has nothing to act on."""
    if nesterov and momentum <= 0:
        raise ValueError(f"Nesterov momentum needs momentum > 0, got {momentum} (or pass --no-nesterov)")
    return torch.optim.SGD(heads.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov)


def step_lr(epoch: int, lr: float, milestones) -> float:
    """Learning rate of ``epoch`` (0-based): ``lr`` divided by 10 at each milestone reached."""
    return lr * 0.1 ** sum(epoch >= milestone for milestone in milestones)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """How many rows have their label among the top-k logits, for each k: float [len(ks)]."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [N, kmax]
    hit = top == labels[:, None]  # [N, kmax]
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in ks]).float()


def train_epoch(features: MultiLayerFeatures, heads: nn.Module, loader, optimizer: torch.optim.Optimizer,
                device: torch.device, num_classes: int | None = None, log_every: int = 0,
                on_log=None, augment=None) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss per stage (over steps and ranks). Only ``heads`` train.

    augment: uint8 views -> normalised inputs for training (``TrainAugment``); None: normalisation only.

    Every ``log_every`` steps (0: never) ``on_log({"step", "img_per_s", "loss_<stage>"...})`` is called;
    only those steps read the losses back from the device.
    """
    features.train()  # the heads' BatchNorm trains; features.train() keeps the backbone in eval mode
    heads.train()
    stages = list(unwrap(heads).heads)
    totals, steps, images_seen, began = None, 0, 0, time.time()
    for step, (images, labels) in enumerate(images_and_labels(loader, "train")):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if step == 0:
            check_labels(labels, num_classes, "train")
        logits = heads(features(images, augment))  # {stage: [N, num_classes]}
        losses = torch.stack([F.cross_entropy(value, labels) for value in logits.values()])  # [stages]
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        totals = losses.detach() if totals is None else totals + losses.detach()
        steps, images_seen = steps + 1, images_seen + images.shape[0]
        if on_log is not None and log_every and steps % log_every == 0:
            # note: .tolist() is a CPU-GPU sync point, on log steps only
            record = {f"loss_{stage}": value for stage, value in zip(stages, losses.tolist())}
            on_log({"step": steps, "img_per_s": round(images_seen / (time.time() - began), 1), **record})
    if totals is None:
        raise ValueError("the train loader yielded no batches (fewer images than one batch?)")
    mean = dist.all_reduce_mean(totals / steps)  # [stages], averaged over ranks
    return {stage: value for stage, value in zip(stages, mean.tolist())}


@torch.no_grad()
def evaluate(features: MultiLayerFeatures, heads: nn.Module, loader, device: torch.device,
             num_classes: int | None = None) -> dict:
    """Top-1 / top-5 accuracy (%) per stage over ``loader`` (summed over ranks): ``{stage: {top1, top5}}``."""
    features.eval()
    heads.eval()
    stages = list(unwrap(heads).heads)
    correct = torch.zeros(len(stages), 2, device=device)  # [stages, (top1, top5)]
    seen = torch.zeros((), device=device)
    for step, (images, labels) in enumerate(images_and_labels(loader, "validation")):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if step == 0:
            check_labels(labels, num_classes, "validation")
        logits = heads(features(images))
        correct += torch.stack([topk_correct(logits[stage], labels) for stage in stages])
        seen += labels.shape[0]
    if dist.is_distributed():  # every rank saw its own shard
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(seen)
    total = max(int(seen), 1)
    result = {stage: {"top1": 100 * c[0].item() / total, "top5": 100 * c[1].item() / total}
              for stage, c in zip(stages, correct)}
    result["images"] = int(seen)
    return result


def flat_accuracies(result: dict) -> dict:
    """``{stage: {top1, top5}, images}`` -> ``{stage_top1, stage_top5, val_images}`` for a log line."""
    flat = {f"{stage}_{k}": v for stage, acc in result.items() if stage != "images" for k, v in acc.items()}
    return {**flat, "val_images": result["images"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m maskco.evaluate.linear", description=__doc__.split("\n\n")[0])
    add_backbone_arguments(parser, random_init_help="evaluate a randomly initialised --arch (baseline)")
    parser.add_argument("--train", required=True, help="labelled training split (ImageFolder root, .txt list, ...)")
    parser.add_argument("--val", required=True, help="labelled validation split")
    parser.add_argument("--num-classes", type=int, help="class count, for sources whose classes cannot be listed")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="multilayer")
    parser.add_argument("--pooling", choices=POOLINGS, default="fixed",
                        help="fixed: DESIGN 4.8's kernels (224 px); adaptive: same grids at any image size")
    parser.add_argument("--epochs", type=int, help="default: 90 (multilayer) / 100 (lastlayer)")
    parser.add_argument("--lr", type=float, help="default: 0.1 (multilayer) / 30 (lastlayer)")
    parser.add_argument("--milestones", type=int, nargs="*", help="epochs where lr /= 10; default 30 60 / 60 80")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction,
                        help="Nesterov momentum; default: on (multilayer, OpenSelfSup) / off (lastlayer, MoCo)")
    parser.add_argument("--color-jitter", action=argparse.BooleanOptionalAction,
                        help="ColorJitter(0.4, 0.4, 0.4, hue 0) on the training views; default: on / off")
    parser.add_argument("--lighting", action=argparse.BooleanOptionalAction,
                        help="PCA lighting noise (alphastd 0.1) on the training views; default: on / off "
                             "(--no-lighting for grey images, which it would tint)")
    parser.add_argument("--weight-decay", type=float, help="default: 1e-4 (multilayer) / 0 (lastlayer)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch over all ranks")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backend", default="torch", help="data backend (pipelines.build_loader)")
    parser.add_argument("--workers", type=int, default=None, help="decode workers per rank (default: backend's)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="backbone autocast; auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    parser.add_argument("--log-every", type=int, default=100, help="log the losses every N steps (0: per epoch only)")
    parser.add_argument("--out-dir", help="default: runs/linear/<checkpoint's folder>-<its name>-<its SHA-256, "
                                          "8 digits>-<protocol>, one per backbone and protocol")
    parser.add_argument("--resume", default="auto", help="auto (out_dir/linear_last.pt if present), none, or a path")
    args = parser.parse_args(argv)
    check_backbone_arguments(parser, args)
    for key, value in PROTOCOL_DEFAULTS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("epochs", "batch_size", "image_size", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name, ok, must in (("lr", args.lr > 0, "> 0"), ("weight_decay", args.weight_decay >= 0, ">= 0"),
                           ("momentum", 0 <= args.momentum < 1, "in [0, 1)"),
                           ("log_every", args.log_every >= 0, ">= 0"), ("seed", args.seed >= 0, ">= 0")):
        if not (math.isfinite(getattr(args, name)) and ok):
            parser.error(f"--{name.replace('_', '-')} must be finite and {must}, got {getattr(args, name)}")
    if any(m < 1 for m in args.milestones):
        parser.error(f"--milestones must be epochs >= 1, got {args.milestones}")
    if args.nesterov and args.momentum <= 0:
        parser.error("--nesterov needs --momentum > 0 (or pass --no-nesterov)")
    return args


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


# the settings that make two runs' heads different things (the epoch count is not: a rerun may extend it)
PROTOCOL_KEYS = ("protocol", "pooling", "image_size", "lr", "milestones", "momentum", "nesterov", "weight_decay",
                 "batch_size", "color_jitter", "lighting", "backend")


def identity(args: argparse.Namespace) -> dict:
    """What the heads evaluate: the backbone (the checkpoint's SHA-256, with its path and size for the
    reader, or a random init and its seed), the arch, the splits and the protocol settings. Stored with
    the heads and in results.json; a resume must match it (:func:`resume_state`)."""
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise ValueError(f"checkpoint {args.checkpoint} does not exist")
        backbone = {"checkpoint": os.path.abspath(args.checkpoint), "bytes": os.path.getsize(args.checkpoint),
                    "sha256": checkpoint.file_sha256(args.checkpoint)}
    else:
        backbone = {"checkpoint": None, "random_init_seed": args.seed}
    return {**backbone, "arch": args.arch, "train": os.path.abspath(args.train), "val": os.path.abspath(args.val),
            **{key: getattr(args, key) for key in PROTOCOL_KEYS}}


def default_out_dir(args: argparse.Namespace, ident: dict) -> str:
    """One folder per backbone and protocol, so a rerun on another checkpoint never resumes these heads."""
    if ident["checkpoint"]:
        folder = os.path.basename(os.path.dirname(ident["checkpoint"]))
        name = f"{folder}-{os.path.splitext(os.path.basename(ident['checkpoint']))[0]}-{ident['sha256'][:8]}"
    else:
        name = f"random-{args.arch}-seed{args.seed}"
    return os.path.join("runs", "linear", f"{name}-{args.protocol}")


def _differences(stored: dict | None, ident: dict) -> list[str]:
    if stored is None:
        return ["no record of the backbone it evaluated (written by an older version)"]
    return [f"{key}: heads {stored.get(key)!r} vs this run {ident.get(key)!r}" for key in ident
            if key not in ("checkpoint", "bytes") and stored.get(key) != ident.get(key)]


def resume_state(path: str, num_classes: int, shapes: dict[str, list[int]], protocol: str,
                 ident: dict | None = None) -> dict:
    """Load a heads checkpoint and refuse one trained for other classes, stages or feature shapes, or (with
    ``ident``) for another backbone, split or protocol setting: its accuracy would be reported as this one's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign file
        raise ValueError(f"linear checkpoint {path} is unreadable: {error}") from None
    if isinstance(state, dict) and state.get("format") == "maskco-linear-v1":
        raise ValueError(f"linear checkpoint {path} has the old heads (BatchNorm1d over flattened features, "
                         "before OpenSelfSup's per-channel BatchNorm2d); use another --out-dir or --resume none")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a linear-evaluation checkpoint (no format {FORMAT!r})")
    if state["num_classes"] != num_classes:
        raise ValueError(f"linear checkpoint {path} has heads for {state['num_classes']} classes, but the "
                         f"train split has {num_classes}; use another --out-dir or --resume none")
    if state["protocol"] != protocol or state["shapes"] != shapes:
        raise ValueError(f"linear checkpoint {path} is for protocol {state['protocol']} with feature shapes "
                         f"{state['shapes']}, this run is {protocol} with {shapes}; use another --out-dir or "
                         "--resume none")
    differences = _differences(state.get("identity"), ident) if ident is not None else []
    if differences:
        raise ValueError(f"linear checkpoint {path} holds heads of another evaluation ({'; '.join(differences)}); "
                         "resuming would report their accuracy as this backbone's: use --resume none to start "
                         "over, or another --out-dir (the default is one per checkpoint and protocol)")
    return state


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ident = identity(args)
    args.out_dir = args.out_dir or default_out_dir(args, ident)
    # ---- distributed + device
    info = dist.init_distributed(None if args.device == "auto" else args.device)
    device, world_size = info.device, info.world_size
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global) must be divisible by the {world_size} ranks")
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(args.seed)  # same heads (and random backbone) on every rank
    log = RunLog(args.out_dir, enabled=info.rank == 0)
    log.write({"config": {**vars(args), "precision": precision}, "git": git_revision(), "world_size": world_size,
               "device": str(device), "torch": torch.__version__})

    # ---- data
    num_classes = class_count(args)
    common = dict(image_size=args.image_size, device=device, rank=info.rank, world_size=world_size,
                  seed=args.seed, workers=args.workers)
    per_rank = args.batch_size // world_size
    train_loader = pipelines.build_loader(args.backend, args.train, batch_size=per_rank,
                                          crop_scale=(0.08, 1.0), **common)
    val_loader = pipelines.build_loader(args.backend, args.val, batch_size=per_rank, eval_mode=True, **common)

    # ---- model: frozen backbone, trainable heads
    features = MultiLayerFeatures(backbone_from_args(args).to(device), args.protocol, args.pooling, precision)
    if device.type == "cuda":
        features.backbone.to(memory_format=torch.channels_last)
    shapes = {stage: list(shape) for stage, shape in features.shapes(args.image_size).items()}
    dims = features.dims(args.image_size)
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

    # ---- resume, then train
    last = os.path.join(args.out_dir, LAST)
    resume = (last if os.path.exists(last) else None) if args.resume == "auto" else (
        None if args.resume == "none" else args.resume)
    start = 0
    if resume:
        state = resume_state(resume, num_classes, shapes, args.protocol, ident)
        unwrap(heads).load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        log.write({"resumed": resume, "epoch": start})
    log.write({"dims": dims, "num_classes": num_classes, "steps_per_epoch": len(train_loader),
               "val_steps": len(val_loader), "start_epoch": start})
    result = {}
    for epoch in range(start, args.epochs):
        lr = step_lr(epoch, args.lr, args.milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loader.set_epoch(epoch)
        if augment is not None:
            augment.set_epoch(epoch)
        began = time.time()
        losses = train_epoch(features, heads, train_loader, optimizer, device, num_classes, args.log_every,
                             lambda record: log.write({"epoch": epoch + 1, **record}), augment)
        record = {"epoch": epoch + 1, "lr": lr, "seconds": round(time.time() - began, 1),
                  **{f"loss_{stage}": value for stage, value in losses.items()}}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            result = evaluate(features, heads, val_loader, device, num_classes)
            record.update(flat_accuracies(result))
        log.write(record)
        if info.rank == 0:
            checkpoint.save_atomic({"format": FORMAT, "epoch": epoch + 1, "protocol": args.protocol, "shapes": shapes,
                                    "num_classes": num_classes, "heads": unwrap(heads).state_dict(),
                                    "optimizer": optimizer.state_dict(), "args": vars(args),
                                    "identity": ident}, last)
    if not result:  # resumed after the last epoch: validate the finished heads once more
        result = evaluate(features, heads, val_loader, device, num_classes)
        log.write({"epoch": start, **flat_accuracies(result)})
    if info.rank == 0:
        with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as handle:
            json.dump({"checkpoint": args.checkpoint or f"random init ({args.arch})", "protocol": args.protocol,
                       "epochs": args.epochs, "identity": ident, **result}, handle, indent=1)
    log.close()
    for loader in (train_loader, val_loader):
        loader.close()
    del heads, optimizer
    dist.shutdown()
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad input: one clear line, no traceback, exit 2
        sys.exit(cli.fail("maskco.evaluate.linear", error))
