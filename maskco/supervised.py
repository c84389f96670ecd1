"""The supervised ceiling of ``make quality``: the same network, views and budget, trained with the labels.

What a label buys at this budget bounds what self-supervision can be asked for: the backbone of a run's
config (arch, stem, width, virtual GPUs) plus one linear classifier, trained with cross-entropy on the
query view of every step (the loader's crop and flip, then MoCo v2's colour augmentation from the same
code the trainer runs, :func:`maskco.method.inputs_from_noise`), the trainer's optimiser settings (SGD,
peak lr by the linear scaling rule, cosine, weight decay) and the same number of epochs. The backbone is
exported as the trainer exports its own, and the kNN monitor runs after every epoch, so the ceiling's
row is measured exactly as the self-supervised rows are.
"""
from __future__ import annotations

import json
import os
import time

import torch
from torch.nn import functional as F

import pipelines
from maskco import schedule
from maskco.config import Config, peak_lr
from maskco.evaluate.knn import knn_monitor
from maskco.export import export_backbone
from maskco.method import MethodSpec, draw_noise, inputs_from_noise
from maskco.model import param_groups, set_virtual_gpus
from maskco.trunk import c5_channels, resnet
from maskco.step import step_seed


def build_classifier(cfg: Config, classes: int) -> torch.nn.Sequential:
    """backbone (fc = Identity) -> Linear(C5 channels, classes); BatchNorm per virtual GPU, as in pretraining."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = set_virtual_gpus(resnet(cfg.arch, cfg.stem, cfg.width, init=cfg.init), cfg.virtual_gpus)
        return torch.nn.Sequential(backbone, torch.nn.Linear(c5_channels(backbone), classes))


def loss_of(logits: torch.Tensor, label: torch.Tensor, classes: int, multilabel: bool) -> torch.Tensor:
    """logits [N, classes]; label [N]: a class, or (``multilabel``) the bit mask of the classes present."""
    if not multilabel:
        return F.cross_entropy(logits, label)
    present = (label[:, None] >> torch.arange(classes, device=label.device)) & 1  # [N, classes]
    return F.binary_cross_entropy_with_logits(logits, present.to(logits.dtype))


def train_supervised(cfg: Config, classes: int, log_path: str, multilabel: bool = False) -> dict:
    """Train on ``cfg.data`` (a labelled ImageFolder) on the CPU; -> ``{"knn_curve", "exported", "step",
    "first_loss", "last_loss"}``. Writes JSON lines (loss every ``log_every`` steps, kNN every ``knn_every``
    epochs) to ``log_path`` and the backbone to ``cfg.out_dir``.

    ``multilabel``: images with several objects (``pipelines.scenes``' ``pretrain_labels.txt``), whose label is
    the bit mask of the classes present; the loss is then the binary cross-entropy of each class's presence
    (the usual supervised pretraining on multi-object images), instead of the cross-entropy of one class."""
    device = torch.device("cpu")
    spec = MethodSpec.from_config(cfg, method="mocov2")  # MoCo v2's views: no box, nothing masked
    loader = pipelines.build_loader(cfg.backend, cfg.data, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                    device=device, seed=cfg.seed, workers=None if cfg.workers < 0 else cfg.workers,
                                    crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio, flip_prob=cfg.flip_prob)
    model = build_classifier(cfg, classes)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.weight_decay_all), lr=0.0,
                                momentum=cfg.sgd_momentum)
    total, peak = cfg.epochs * len(loader), peak_lr(cfg, 1)
    generator, step, curve, losses = torch.Generator(), 0, [], []
    os.makedirs(cfg.out_dir, exist_ok=True)
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            for epoch in range(cfg.epochs):
                loader.set_epoch(epoch)
                for batch in loader:
                    generator.manual_seed(step_seed(cfg.seed, step, 0))
                    x = inputs_from_noise(batch, spec, draw_noise(spec, len(batch), device, generator)).x_q
                    value = loss_of(model(x), batch.label, classes, multilabel)
                    for group in optimizer.param_groups:
                        group["lr"] = schedule.cosine(step, total, peak, cfg.min_lr, 0)
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    optimizer.step()
                    step += 1
                    if step % cfg.log_every == 0 or step == total:
                        losses.append(value.item())
                        log.write(json.dumps({"time": time.time(), "step": step, "loss": losses[-1]}) + "\n")
                if cfg.knn_every and (epoch + 1) % cfg.knn_every == 0:
                    result = knn_monitor(model[0], cfg.knn_train, cfg.knn_val, cfg.image_size, device,
                                         cfg.batch_size, None if cfg.workers < 0 else cfg.workers)
                    curve.append([step, result["top1"], result["top1_k20"]])
                    log.write(json.dumps({"time": time.time(), "epoch": epoch + 1, "step": step,
                                          **{f"knn_{k}": v for k, v in result.items()}}) + "\n")
                log.flush()
    finally:
        loader.close()
    exported = export_backbone(model[0].state_dict(), cfg.out_dir, cfg.arch, cfg.stem, cfg.width)
    return {"knn_curve": curve, "exported": exported, "step": step, "first_loss": losses[0],
            "last_loss": losses[-1]}
