"""``python -m maskco.evaluate.detect``: fine-tune a Faster R-CNN on a pretrained backbone, score it with pycocotools.

The paper's transfer test in one command: the backbone (a pretraining checkpoint, an exported backbone, or
``--random-init``) becomes a torchvision Faster R-CNN in the paper's R50-C4 layout (``--layout c4``: RPN on
C4, RoIAlign, the pretrained res5 as the box head; ``fpn`` as the other option; ``detection_model``), every
layer fine-tuned with trainable BatchNorm, on a COCO-layout folder (``pipelines.scenes``, COCO) or Pascal VOC
(``detection_data``). The schedule has the VOC config's shape (``schedule.step_decay``: linear warm-up, then
lr / 10 at 3/4 and 11/12 of the iterations), SGD with momentum 0.9 and weight decay 1e-4, horizontal flips.
Then the test split is detected and scored by pycocotools (``detection_eval``): AP, AP50, AP75.

    python -m maskco.evaluate.detect --checkpoint runs/transfer/maskco-scenes/checkpoint_last.pt --data data/scenes
    python -m maskco.evaluate.detect --random-init --arch resnet18 --stem cifar --width 0.25 --data data/scenes
    python -m maskco.evaluate.detect --checkpoint backbone_torchvision.pth --data /datasets/VOC --preset voc

``--preset`` sizes the detector and its schedule: ``scenes`` (64 px canvases on a CPU, the default), ``voc``
and ``coco`` (MoCo's detectron2 settings; docs/transfer.md says how this proxy relates to detectron2). Writes
``out_dir/results.json`` (the AP figures with what was evaluated) and ``out_dir/log.jsonl``; the detector
checkpoints to ``out_dir/detector_last.pt`` every ``--ckpt-every`` iterations and on SIGINT / SIGTERM (exit
130 / 143), and the same command resumes it, only for the same backbone, data and settings. A finished run
is not repeated: its results are printed again (``--resume none`` starts over).
"""
from __future__ import annotations

from maskco import tool_args

if __name__ == "__main__":  # the flags first, then torch: --help and a bad flag answer at once (tool_args)
    tool_args.run_as_main("maskco.evaluate.detect", tool_args.detect_args, (ValueError, OSError))

import argparse
import json
import math
import os
import sys
import time

import torch

from maskco import schedule
from maskco.atomic_file import atomic_write
from maskco.checkpoint import file_sha256, save_atomic
from maskco.engine import StopRequest
from maskco.evaluate import detection_data
from maskco.evaluate.detection_eval import box_ap, coco_results
from maskco.evaluate.detection_model import DetectorShape, build_detector
from maskco.export import backbone_from_args
from maskco.runlog import RunLog, git_revision, signal_name
from pipelines import ignore_stop_signals

FORMAT = "maskco-detector-1"
LAST, RESULTS = "detector_last.pt", "results.json"
DEFAULT_SPLITS = {"coco": ("train", "test"), "voc": ("2007-trainval+2012-trainval", "2007-test")}
LOG_EVERY = 50  # iterations between log records
# the settings that make two fine-tunings different things (the data and backbone are in identity() too)
SETTING_KEYS = ("preset", "layout", "iterations", "batch_size", "lr", "warmup", "milestones", "min_size", "test_size",
                "max_size", "anchor_sizes", "roi_size", "rois_per_image", "rpn_batch", "proposals", "detections",
                "weight_decay", "momentum", "seed")


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (``tool_args.detect_args``) and :func:`run`: the results record."""
    return run(tool_args.detect_args(argv))


def identity(args: argparse.Namespace, fmt: str) -> dict:
    """What a fine-tuning measures: the backbone (its file's SHA-256, or a random init's shape and seed), the
    data and splits, and every setting; a resume or a finished result must match it."""
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise ValueError(f"checkpoint {args.checkpoint} does not exist")
        backbone = {"checkpoint": os.path.abspath(args.checkpoint), "sha256": file_sha256(args.checkpoint)}
    else:
        backbone = {"checkpoint": None, "random_init": [args.arch, args.stem or "imagenet", args.width or 1.0,
                                                        args.init or "torchvision"]}
    settings = {key: list(value) if isinstance(value, tuple) else value
                for key, value in ((key, getattr(args, key)) for key in SETTING_KEYS)}
    return {**backbone, "data": os.path.abspath(args.data), "format": fmt, "train_split": args.train_split,
            "test_split": args.test_split, **settings}


def default_out_dir(args: argparse.Namespace) -> str:
    if args.checkpoint:
        name = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))) or "backbone"
    else:
        name = f"random-{args.arch}"
    return os.path.join("runs", "detect", f"{name}-{args.layout}")


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


# ---- training

def batch_order(num_images: int, batch_size: int, seed: int, start: int, total: int):
    """Iteration i's images and flips, for i in start..total-1: consecutive slices of one permutation per
    epoch (numpy-free: torch generators seeded by (seed, epoch) and (seed, iteration)), so a resumed run
    sees exactly the batches of an uninterrupted one. Yields lists of (index, flip)."""
    order, epoch = None, -1
    for iteration in range(start, total):
        batch = []
        for position in range(iteration * batch_size, (iteration + 1) * batch_size):
            if position // num_images != epoch:
                epoch = position // num_images
                order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            batch.append(int(order[position % num_images]))
        flips = torch.rand(batch_size, generator=torch.Generator().manual_seed(seed * 100003 + 7919 * iteration + 1))
        yield list(zip(batch, (flips < 0.5).tolist()))


class TrainImages(torch.utils.data.Dataset):
    """``dataset[(index, flip)]`` -> (image [3, H, W] in 0..1, target), for a DataLoader's batch sampler."""

    def __init__(self, dataset: detection_data.DetectionSet):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, flip = key
        images, targets = detection_data.training_batch(self.dataset, [index], torch.tensor([flip]))
        return images[0], targets[0]


def fine_tune(model, dataset, args, device, optimizer, start: int, log: RunLog, save) -> tuple[int, int]:
    """Train from iteration ``start`` to ``args.iterations``; -> (the iteration reached, the stop signal or 0):
    on SIGINT / SIGTERM it stops at the next iteration, after ``save`` has written it. A non-finite loss ends
    the run (exit 3)."""
    model.train()
    model.transform.min_size = tuple(args.min_size)
    loader = torch.utils.data.DataLoader(
        TrainImages(dataset), batch_sampler=list(batch_order(len(dataset), args.batch_size, args.seed, start,
                                                             args.iterations)),
        num_workers=args.workers, collate_fn=lambda batch: tuple(zip(*batch)), worker_init_fn=ignore_stop_signals)
    iteration, began, window = start, time.time(), []
    with StopRequest() as stop:
        for images, targets in loader:
            for group in optimizer.param_groups:
                group["lr"] = schedule.step_decay(iteration, args.iterations, args.lr, args.warmup, args.milestones)
            losses = model([image.to(device) for image in images],
                           [{key: value.to(device) for key, value in target.items()} for target in targets])
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            window.append(loss.detach())
            if iteration % LOG_EVERY == 0 or iteration == args.iterations:
                value = torch.stack(window).mean().item()  # note: a host sync, on log steps only
                if not math.isfinite(value):
                    log.write({"error": f"the detection loss is {value} at iteration {iteration}", "diverged": True})
                    print(f"maskco.evaluate.detect: the loss is {value} at iteration {iteration} (diverged); try a "
                          "lower --lr", file=sys.stderr)
                    sys.exit(3)
                rate = (iteration - start) / (time.time() - began)
                log.write({"step": iteration, "loss": round(value, 4),
                           **{k: round(v.item(), 4) for k, v in losses.items()},
                           "lr": optimizer.param_groups[0]["lr"], "steps_per_s": round(rate, 3),
                           "img_per_s": round(rate * args.batch_size, 1)})
                window = []
            if stop.signal or iteration % args.ckpt_every == 0:
                save(iteration)
            if stop.signal:
                return iteration, stop.signal
    return iteration, 0


@torch.no_grad()
def predict(model, dataset, args, device, batch_size: int = 16) -> list[dict]:
    """Detect every test image (``dataset.eval_paths``) at the test size -> COCO results."""
    model.eval()
    model.transform.min_size = (args.test_size,)
    results = []
    paths, ids = dataset.eval_paths, dataset.eval_ids
    for begin in range(0, len(paths), batch_size):
        images = [detection_data.read_image(path).to(device) for path in paths[begin:begin + batch_size]]
        results.extend(coco_results(model(images), ids[begin:begin + batch_size], dataset.category_ids))
    return results


# ---- the tool

def run(args: argparse.Namespace) -> dict:
    """Fine-tune and score the detector ``args`` describe (parsed by ``tool_args.detect_args``)."""
    # ---- data
    fmt = detection_data.detect_format(args.data) if args.format == "auto" else args.format
    args.train_split = args.train_split or DEFAULT_SPLITS[fmt][0]
    args.test_split = args.test_split or DEFAULT_SPLITS[fmt][1]
    train_set = detection_data.load_split(args.data, args.train_split, fmt)
    test_set = detection_data.load_split(args.data, args.test_split, fmt)
    if train_set.category_ids != test_set.category_ids:
        raise detection_data.DataError(f"{train_set.source} and {test_set.source} have different categories")
    ident = identity(args, fmt)
    args.out_dir = args.out_dir or default_out_dir(args)
    finished = read_json(os.path.join(args.out_dir, RESULTS))
    if args.resume != "none" and finished and finished.get("identity") == ident:
        print(f"maskco.evaluate.detect: already finished ({os.path.join(args.out_dir, RESULTS)}); nothing to do: "
              "use --resume none or another --out-dir", file=sys.stderr)
        print(json.dumps(finished))
        return finished

    # ---- model
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        raise ValueError("--device cuda, but torch sees no CUDA GPU here; use --device cpu or auto")
    torch.manual_seed(args.seed)  # the random init (if any) and the new layers
    shape = DetectorShape(tuple(args.min_size), args.test_size, args.max_size, tuple(args.anchor_sizes),
                          args.roi_size, args.rois_per_image, args.rpn_batch, tuple(args.proposals), args.detections)
    model = build_detector(backbone_from_args(args), args.layout, len(train_set.category_ids), shape).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]  # weight decay on weights, not BN or biases
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=args.lr, momentum=args.momentum)

    # ---- resume, then train
    log = RunLog(args.out_dir)
    start = resume(args, model, optimizer, ident)
    log.write({"config": vars(args), "identity": ident, "git": git_revision(),
               "device": str(device), "torch": torch.__version__, "train_images": len(train_set),
               "test_images": len(test_set.eval_paths), "start_iteration": start})

    def save(iteration: int) -> None:
        save_atomic({"format": FORMAT, "identity": ident, "iteration": iteration, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
                    os.path.join(args.out_dir, LAST))

    began = time.time()
    log.start_progress(args.iterations, start)  # a progress bar on a terminal
    try:
        reached, stopped_by = fine_tune(model, train_set, args, device, optimizer, start, log, save)
    finally:
        log.stop_progress()
    if stopped_by:
        log.write({"interrupted": signal_name(stopped_by), "step": reached})
        log.close()
        print(f"maskco.evaluate.detect: stopped by {signal_name(stopped_by)} at iteration {reached}; the same "
              f"command resumes from {os.path.join(args.out_dir, LAST)}", file=sys.stderr)
        sys.exit(128 + stopped_by)
    save(reached)
    train_seconds = time.time() - began

    # ---- test
    results = predict(model, test_set, args, device)
    if args.predictions:
        atomic_write(args.predictions, lambda stream: stream.write(json.dumps(results).encode()))
    record = {**box_ap(test_set.coco, results), "detections": len(results), "layout": args.layout,
              "preset": args.preset, "iterations": args.iterations, "train_images": len(train_set),
              "test_images": len(test_set.eval_paths), "train_seconds": round(train_seconds, 1),
              "seconds": round(time.time() - began, 1), "identity": ident}
    text = json.dumps(record, indent=1).encode()
    atomic_write(os.path.join(args.out_dir, RESULTS), lambda stream: stream.write(text))
    log.write({"finished": True, **{k: record[k] for k in ("ap", "ap50", "ap75", "seconds")}})
    log.close()
    print(json.dumps(record))
    return record


def resume(args, model, optimizer, ident: dict) -> int:
    """``--resume``: auto (``out_dir/detector_last.pt`` if present), none, or a path -> the iteration to start
    from; a checkpoint of another fine-tuning (backbone, data, settings) is refused in one line."""
    path = os.path.join(args.out_dir, LAST) if args.resume == "auto" else None if args.resume == "none" else args.resume
    if not path or not os.path.exists(path):
        if args.resume not in ("auto", "none"):
            raise ValueError(f"--resume {path}: no such file")
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign file: torch raises several types
        raise ValueError(f"detector checkpoint {path} is unreadable ({type(error).__name__}); delete it or use "
                         "--resume none") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a detector checkpoint of maskco.evaluate.detect")
    differences = [f"{key}: checkpoint {state['identity'].get(key)!r} vs this run {value!r}"
                   for key, value in ident.items() if state["identity"].get(key) != value]
    if differences:
        raise ValueError(f"detector checkpoint {path} is another fine-tuning ({'; '.join(differences[:3])}); use "
                         "--resume none to start over, or another --out-dir")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["iteration"])
