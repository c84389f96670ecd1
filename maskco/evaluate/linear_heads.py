"""The linear classifiers on frozen features (DESIGN 4.8): the heads, their SGD and step schedule, one
training pass and the validation pass. ``maskco.evaluate.linear`` assembles them into the tool.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from maskco import dist
from maskco.evaluate.features import MultiLayerFeatures, check_labels, images_and_labels
from maskco.model import unwrap


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
