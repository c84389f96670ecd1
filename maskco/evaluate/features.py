"""Frozen multi-layer features of a torchvision ResNet for linear evaluation (DESIGN 4.8).

The paper evaluates with OpenSelfSup's multi-head benchmark
(``configs/benchmarks/linear_classification/imagenet/r50_multihead.py``, after Goyal et al.'s
https://github.com/facebookresearch/fair_self_supervision_benchmark): the outputs of conv1 (after
bn1 + ReLU, before the max-pool: its ResNet's ``out_indices`` 0) and of res2..res5 are each
average-pooled to about 9k values (its ``MultiPooling``, ``pool_type="specified"``). The pooled maps
come back unflattened, [N, C, g, g], because the classifier normalises them per channel before it
flattens them (``linear.LinearHeads``). For ResNet-50 at 224 px:

    stage  map                  pool (kernel, stride, pad)  grid   dims
    conv1  [N,   64, 112, 112]  (10, 10, 4)             12x12  9216
    res2   [N,  256,  56,  56]  (16,  8, 0)              6x6   9216
    res3   [N,  512,  28,  28]  (13,  5, 0)              4x4   8192
    res4   [N, 1024,  14,  14]  ( 8,  3, 0)              3x3   9216
    res5   [N, 2048,   7,   7]  ( 6,  1, 0)              2x2   8192

``pooling="adaptive"`` pools each map to the same grid with ``adaptive_avg_pool2d`` instead, so that
small images (a CPU demo at 64-128 px) give the same dimensions; at 224 px use the fixed kernels.
``protocol="lastlayer"`` is MoCo's: res5 global-average-pooled (2048-d for ResNet-50).

Also here: the input side shared by linear evaluation and the kNN monitor (``images_and_labels``,
``source_classes``): any loader of ``pipelines.Batch`` or of ``(images, labels)`` pairs works.
"""
from __future__ import annotations

import copy
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from maskco import vocab
from maskco.augment import normalize

STAGES = ("conv1", "res2", "res3", "res4", "res5")
# (kernel, stride, padding) of avg_pool2d: OpenSelfSup's MultiPooling.POOL_PARAMS['resnet50']
# (openselfsup/models/utils/multi_pooling.py); conv1's padding counts as zeros (count_include_pad=True,
# nn.AvgPool2d's default there and F.avg_pool2d's here)
POOL = {"conv1": (10, 10, 4), "res2": (16, 8, 0), "res3": (13, 5, 0), "res4": (8, 3, 0), "res5": (6, 1, 0)}
GRID = {"conv1": 12, "res2": 6, "res3": 4, "res4": 3, "res5": 2}  # output side of POOL at 224 px
PROTOCOLS, POOLINGS = vocab.PROTOCOLS, vocab.POOLINGS


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float [N, 3, S, S] in [0, 1] (torchvision's ToTensor); anything else -> ValueError."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, S, S], got {images.dtype} {list(images.shape)}")
    return images.float() / 255


def prepare_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> ImageNet-normalised float [N, 3, S, S] (what the pretrainer feeds its backbone)."""
    return normalize(to_unit(images))


def images_and_labels(loader, split: str = "data"):
    """Yield ``(images uint8 [N, 3, S, S], labels int64 [N])`` from Batches or pairs; unlabelled -> ValueError."""
    for item in loader:
        images, labels = (item.view_q, item.label) if hasattr(item, "view_q") else item
        if labels is None:
            raise ValueError(f"the {split} loader yields no labels; evaluation needs a labelled split")
        yield images, labels


def check_labels(labels: torch.Tensor, num_classes: int | None, split: str) -> None:
    """Refuse unlabelled (-1) or out-of-range labels; one host sync, so call it once per epoch, not per step."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"the {split} split has unlabelled images (label -1); evaluation needs labels "
                         "(an ImageFolder root, or a .txt list with a label after each path)")
    if num_classes is not None and high >= num_classes:
        raise ValueError(f"the {split} split has label {high}, but there are only {num_classes} classes")


def source_classes(source: str, split: str) -> list[str] | None:
    """Class names of an ImageFolder / .txt ``source``; ValueError if it has no labels; None if not listable.

    Sources the listing does not read (an FFCV .beton, DALI shards) return None: their labels are
    checked batch by batch instead.
    """
    from pipelines.sources import DataError, list_images  # lazily: the evaluation math needs no pipelines

    try:
        classes = list_images(source).classes
    except DataError:
        if os.path.isdir(source) or str(source).endswith(".txt") or not os.path.exists(source):
            raise
        return None
    if not classes:
        raise ValueError(f"{split} source {source} has no labels (a flat folder or a list without labels); "
                         "linear and kNN evaluation need an ImageFolder root (one folder per class) or a "
                         ".txt list with a label after each path")
    return classes


class MultiLayerFeatures(nn.Module):
    """Frozen backbone -> ``{stage: [N, C, g, g]}`` pooled maps (``{"res5": [N, C]}`` for lastlayer).

    backbone: a torchvision ResNet (its ``fc`` is not used). Its parameters get ``requires_grad=False`` and it
    stays in eval mode whatever ``train()`` is called with, so BatchNorm running statistics never change:
    the backbone is bit-identical after any amount of linear training.
    forward(images uint8 [N, 3, S, S], augment=None) runs under ``torch.no_grad()``; ``augment`` turns the
    images into normalised float inputs (the linear training views: ``linear_augment.TrainAugment``), by
    default they are only normalised. ``precision="bf16"`` autocasts the backbone (features come back as
    float32 either way).
    """

    def __init__(self, backbone: nn.Module, protocol: str = "multilayer", pooling: str = "fixed",
                 precision: str = "fp32"):
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        parts = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        missing = [name for name in parts if not hasattr(backbone, name)]
        if missing:
            raise ValueError(f"backbone must be a torchvision ResNet; it has no {', '.join(missing)}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.protocol, self.pooling, self.precision = protocol, pooling, precision
        self.stages = STAGES if protocol == "multilayer" else ("res5",)

    def train(self, mode: bool = True) -> "MultiLayerFeatures":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm must keep using (and never update) its running statistics
        return self

    def _pool(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, C, grid, grid] (or [N, C] for lastlayer)."""
        if self.protocol == "lastlayer":
            return x.float().mean((2, 3))  # [N, C]
        if self.pooling == "adaptive":
            return F.adaptive_avg_pool2d(x.float(), GRID[stage])
        kernel, stride, padding = POOL[stage]
        if min(x.shape[2:]) + 2 * padding < kernel:
            raise ValueError(f"{stage} map {list(x.shape[2:])} is smaller than its pooling kernel {kernel}: "
                             f"use 224 px images (the protocol's size) or pooling='adaptive'")
        return F.avg_pool2d(x.float(), kernel, stride, padding)  # [N, C, grid, grid]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, augment=None) -> dict[str, torch.Tensor]:
        x = prepare_images(images) if augment is None else augment(images)  # [N, 3, S, S] normalised
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)  # cuDNN's fast layout for convolutions
        net = self.backbone
        out = {}
        autocast_device = "cuda" if x.is_cuda else "cpu"  # also for "meta" inputs (see dims)
        with torch.autocast(autocast_device, torch.bfloat16, enabled=self.precision == "bf16"):
            x = net.relu(net.bn1(net.conv1(x)))  # conv1: [N, 64, S/2, S/2]
            if "conv1" in self.stages:
                out["conv1"] = self._pool("conv1", x)
            x = net.maxpool(x)
            for stage, layer in zip(STAGES[1:], (net.layer1, net.layer2, net.layer3, net.layer4)):
                x = layer(x)  # res2..res5: [N, C, S/4 .. S/32, ...]
                if stage in self.stages:
                    out[stage] = self._pool(stage, x)
        return out

    def shapes(self, image_size: int) -> dict[str, tuple[int, ...]]:
        """Per-image feature shape per stage for ``image_size`` inputs, (C, g, g) or (C,): a forward of a
        meta-device twin (shapes only, no compute)."""
        twin = MultiLayerFeatures(copy.deepcopy(self.backbone).to("meta"), self.protocol, self.pooling)
        probe = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device="meta")
        return {stage: tuple(value.shape[1:]) for stage, value in twin(probe).items()}

    def dims(self, image_size: int) -> dict[str, int]:
        """Flattened feature width per stage (what each classifier's Linear takes) for ``image_size`` inputs."""
        return {stage: math.prod(shape) for stage, shape in self.shapes(image_size).items()}
