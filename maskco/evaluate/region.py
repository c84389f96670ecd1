"""Region-level kNN probe: are the backbone's region features those of the object in the box?

The paper's claim is region features that transfer to detection; this measures it in small, on the
mosaics of ``pipelines.mosaics`` (four Fashion-MNIST items in a 2 x 2 grid). Each mosaic is resized to
``2 * image_size``, so every item is at the scale of a training view (a 32 px view: 64 px mosaics),
normalised as the trainer normalises, and run through the backbone's trunk (conv1 ... layer4, eval mode);
each item's box is pooled from C5 by the trainer's own box -> feature-map mapping
(``maskco.model.region_means``, what ``Encoder.pool`` calls: receptive-field centring, RoI-align means).
Query items (test split) are classified by weighted kNN (``maskco.evaluate.knn``) against bank items
(train split):

    region_knn_top1          k = 200, t = 0.1 (InstDisc's kNN)     region features
    region_knn_top1_k20      k = 20,  t = 0.07 (the kNN monitor's)
    region_knn_top1_global   k = 200, t = 0.1                      each item cropped out on its own,
    region_knn_top1_global_k20                                     resized to image_size, global pool

The global rows are what an image-level feature gives on the same items with the object alone in the
picture; the region rows must find the item among its three neighbours in one shared feature map.

    python -m maskco.evaluate.region --random-init --arch resnet18 --image-size 32 --probe-dir data/mosaic_probe
"""
from __future__ import annotations

from maskco import tool_args

if __name__ == "__main__":  # the flags first, then torch: --help and a bad flag answer at once (tool_args)
    tool_args.run_as_main("maskco.evaluate.region", tool_args.region_args)

import argparse
import contextlib
import json
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from maskco import cli
from maskco.evaluate.features import prepare_images
from maskco.evaluate.knn import knn_scores
from maskco.model import cell_centre, region_means

TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
KNN = {"": (200, 0.1), "_k20": (20, 0.07)}  # result suffix -> (k, temperature)


def trunk(backbone: nn.Module) -> nn.Sequential:
    """A torchvision ResNet's conv1 ... layer4 as one module (shared, not copied): ``[N, 3, S, S]`` -> C5.

    Any stem works (the small-image stem's max-pool is an ``nn.Identity``); a missing part -> ValueError.
    """
    missing = [name for name in TRUNK if not hasattr(backbone, name)]
    if missing:
        raise ValueError(f"backbone must be a torchvision ResNet; it has no {', '.join(missing)}")
    return nn.Sequential(*(getattr(backbone, name) for name in TRUNK))


def feature_stride(input_size: int, map_size: int) -> int:
    """C5's stride from the input side and C5's side: every stride-2 layer of a ResNet gives ``ceil(n / 2)``,
    so ``map = ceil(input / stride)``, and the stride is the smallest power of two that gives it (exact
    whenever C5 has at least 2 cells; 32 px -> 1 cell is read as stride 32)."""
    if input_size < 1 or map_size < 1:
        raise ValueError(f"sizes must be >= 1, got input {input_size}, map {map_size}")
    return 2 ** max(0, math.ceil(math.log2(input_size / map_size) - 1e-9))


def views(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey uint8 ``[N, H, W]`` -> uint8 ``[N, 3, size, size]``: bilinear resize (antialiased, as PIL's), as RGB."""
    x = F.interpolate(images[:, None].float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)  # [N, 1, size, size]
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)  # [N, 3, size, size]


def crops(mosaics: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mosaics uint8 ``[M, H, W]`` + slot boxes ``[L, 4]`` (integer, one size) -> each item alone ``[M * L, h, w]``,
    mosaic-major (the order of :func:`region_features`)."""
    sides = boxes[:, 2:] - boxes[:, :2]  # [L, 2]
    if not torch.equal(boxes, boxes.round()) or not bool((sides == sides[0]).all()):
        raise ValueError(f"item boxes must be integer pixels and all of one size, got {boxes.tolist()}")
    slots = [mosaics[:, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes.long().tolist()]  # L x [M, h, w]
    return torch.stack(slots, dim=1).flatten(0, 1)  # [M*L, h, w]


@torch.no_grad()
def region_features(backbone: nn.Module, mosaics: torch.Tensor, boxes: torch.Tensor, view_size: int,
                    batch_size: int = 128, sampling_ratio: int = 2, output_size: int = 7,
                    precision: str = "fp32") -> tuple[torch.Tensor, int]:
    """Mosaics uint8 ``[M, H, W]``, item boxes ``[L, 4]`` in mosaic pixels -> (unit region features
    ``[M * L, C]`` mosaic-major, C5 stride). Each mosaic is resized to ``view_size`` and the boxes with it;
    ``sampling_ratio`` and ``output_size`` are the trainer's ``roi_sampling_ratio`` / ``roi_output_size``."""
    net = trunk(backbone)
    device = next(backbone.parameters()).device
    scale = view_size / mosaics.shape[-1]
    view_boxes = (boxes.float() * scale).to(device)  # [L, 4] view pixels
    features, stride = [], None
    with evaluating(backbone):
        for start in range(0, len(mosaics), batch_size):
            x = prepare_images(views(mosaics[start:start + batch_size].to(device), view_size))  # [B, 3, V, V]
            c5 = _run(net, x, precision)  # [B, C, h, w]
            stride = stride or feature_stride(view_size, c5.shape[-1])
            pooled = region_means(c5, view_boxes.expand(len(x), -1, -1), stride, cell_centre(stride, "receptive"),
                                  sampling_ratio, output_size)  # [B, L, C]
            features.append(F.normalize(pooled.flatten(0, 1), dim=1))  # [B*L, C]
    return torch.cat(features), stride


@torch.no_grad()
def global_features(backbone: nn.Module, mosaics: torch.Tensor, boxes: torch.Tensor, image_size: int,
                    batch_size: int = 512, precision: str = "fp32") -> torch.Tensor:
    """The baseline: each item cropped out of its mosaic, resized to ``image_size``, C5 globally averaged ->
    unit features ``[M * L, C]``, in :func:`region_features`' order."""
    net = trunk(backbone)
    device = next(backbone.parameters()).device
    items = crops(mosaics, boxes)  # [M*L, h, w]
    features = []
    with evaluating(backbone):
        for start in range(0, len(items), batch_size):
            x = prepare_images(views(items[start:start + batch_size].to(device), image_size))  # [B, 3, S, S]
            features.append(F.normalize(_run(net, x, precision).mean((2, 3)), dim=1))  # [B, C]
    return torch.cat(features)


def _run(net: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """The trunk on normalised images -> fp32 C5 (channels_last on CUDA: cuDNN's fast layout)."""
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=precision == "bf16"):
        return net(x).float()


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode inside (BatchNorm's running statistics, none of them moved), its mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
         k: int, temperature: float) -> float:
    """Weighted-kNN top-1 accuracy (%) of the queries ``[Q, C]`` against the bank ``[N, C]`` (unit rows)."""
    num_classes = int(torch.cat([bank_labels, query_labels]).max()) + 1
    scores = knn_scores(bank, bank_labels, queries, num_classes, k, temperature)  # [Q, classes]
    return 100 * (scores.argmax(1) == query_labels).float().mean().item()


def region_probe(backbone: nn.Module, probe_sets: dict, image_size: int, device=None, batch_size: int = 128,
                 sampling_ratio: int = 2, output_size: int = 7, precision: str = "fp32",
                 global_baseline: bool = True) -> dict:
    """The probe on ``probe_sets`` ({"bank", "query"}: ``.npz`` paths from ``pipelines.mosaics.write_probe_sets``,
    or the dicts ``load_probe_set`` returns) -> {"region_knn_top1", "region_knn_top1_k20", and unless
    ``global_baseline=False`` (which halves the cost) "region_knn_top1_global", "region_knn_top1_global_k20"}
    (%), plus the item counts and C5's stride.

    backbone: a torchvision ResNet (``fc = nn.Identity()``), moved to ``device`` if given; its train/eval mode
    is restored afterwards. image_size: the pretraining view size (an item is shown at that size).
    batch_size: mosaics per forward (the global baseline runs 4x as many items, each a quarter of the pixels).
    sampling_ratio, output_size: the trainer's ``roi_sampling_ratio`` and ``roi_output_size``.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    backbone = backbone.to(device) if device is not None else backbone
    device = next(backbone.parameters()).device
    features = {"": {}, "_global": {}} if global_baseline else {"": {}}  # result infix -> split -> [items, C]
    labels = {}  # split -> [items]
    for split in ("bank", "query"):
        probe = _load(probe_sets[split])
        mosaics, boxes = torch.from_numpy(probe["images"]), torch.from_numpy(probe["boxes"])
        item_side = float(boxes[0, 2] - boxes[0, 0])
        view_size = round(image_size * mosaics.shape[-1] / item_side)  # 2 x image_size for a 2 x 2 grid
        features[""][split], stride = region_features(backbone, mosaics, boxes, view_size, batch_size,
                                                      sampling_ratio, output_size, precision)
        if global_baseline:
            features["_global"][split] = global_features(backbone, mosaics, boxes, image_size, 4 * batch_size,
                                                         precision)
        labels[split] = torch.from_numpy(probe["labels"]).flatten().to(device)
    out = {f"region_knn_top1{kind}{suffix}": top1(unit["bank"], labels["bank"], unit["query"], labels["query"],
                                                   k, temperature)
           for kind, unit in features.items() for suffix, (k, temperature) in KNN.items()}
    return {**out, "region_bank_items": len(labels["bank"]), "region_query_items": len(labels["query"]),
            "region_stride": stride}


def _load(probe) -> dict:
    from pipelines.mosaics import load_probe_set  # lazily: the evaluation math needs no pipelines

    return load_probe_set(probe) if isinstance(probe, str) else probe


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (``tool_args.region_args``) and :func:`run`: the probe's record."""
    return run(tool_args.region_args(argv))


def run(args: argparse.Namespace) -> dict:
    """The region probe of the backbone ``args`` name: prints the record (and writes ``--out``)."""
    from maskco.dist import resolve_precision
    from maskco.export import backbone_from_args
    from pipelines.mosaics import write_probe_sets

    cli.check_device(args.device)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    # ---- data, then model, then the probe
    probe_sets = write_probe_sets(args.probe_dir, args.fmnist_dir, args.bank, args.query, args.seed)
    torch.manual_seed(args.seed)
    backbone = backbone_from_args(args)
    result = region_probe(backbone, probe_sets, args.image_size, device, args.batch_size,
                          precision=resolve_precision(args.precision, device), global_baseline=args.global_baseline)
    record = {"checkpoint": args.checkpoint or f"random init ({args.arch})", "image_size": args.image_size, **result}
    print(json.dumps(record))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
    return record

