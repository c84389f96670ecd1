"""``python -m maskco.bench.reference_mocov2``: a plain MoCo v2 loop, written apart from the trainer, to
compare the trainer's learning curve with (BENCHMARKS.md "Why the old setup failed").

Nothing of the trainer's step, loader, augmentation, loss or optimiser is used: torchvision transforms
on the Fashion-MNIST arrays (RandomResizedCrop(32, 0.2-1) of the 28 px image, flip, brightness and
contrast 0.4 with p 0.8), MoCo's CIFAR-demo SplitBatchNorm (``view(N/G, G*C, H, W)``) in both encoders,
the key batch shuffled across the groups, a queue, an EMA key encoder and SGD with a per-step cosine,
as MoCo's ``builder.py`` and CIFAR demo write them. Only the backbone's constructor (``trunk.resnet``,
random init) and the evaluation (``evaluate.knn.knn_monitor`` on the same labelled folders) are shared,
so the figures sit on the same axis as the trainer's monitor points.

    python -m maskco.bench.reference_mocov2 --epochs 2 --out runs/reference/log.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from maskco import trunk
from maskco.evaluate.knn import knn_monitor
from pipelines import fmnist


class SplitBatchNorm(nn.BatchNorm2d):
    """MoCo's CIFAR demo: BatchNorm statistics per ``n % groups`` sample group (its ``view`` trick)."""

    def __init__(self, num_features: int, groups: int):
        super().__init__(num_features)
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        if not self.training or self.groups == 1:
            return super().forward(x)
        g = self.groups
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        y = F.batch_norm(x.view(-1, c * g, h, w), mean, var, self.weight.repeat(g), self.bias.repeat(g),
                         True, self.momentum, self.eps).view(n, c, h, w)
        self.running_mean.copy_(mean.view(g, c).mean(0))
        self.running_var.copy_(var.view(g, c).mean(0))
        return y


def split_bn(module: nn.Module, groups: int) -> nn.Module:
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, SplitBatchNorm(child.num_features, groups))
    return module


class Encoder(nn.Module):
    """Backbone + MoCo v2's MLP head (hidden = C5 width unless given), L2-normalised output."""

    def __init__(self, arch, stem, width, groups, hidden, dim=128, init="torchvision"):
        super().__init__()
        self.backbone = split_bn(trunk.resnet(arch, stem, width, init=init), groups)
        c5 = trunk.c5_channels(self.backbone)
        hidden = hidden or c5
        self.head = nn.Sequential(nn.Linear(c5, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)), dim=1)


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, size: int):
        self.images = images
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4)], p=0.8), T.Grayscale(3), T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i])
        return self.transform(image), self.transform(image)


def train(args) -> list[dict]:
    torch.manual_seed(args.seed)
    images, _ = fmnist.load_split(args.fmnist_dir, "train")
    loader = torch.utils.data.DataLoader(TwoViews(images, args.image_size), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers, drop_last=True,
                                         persistent_workers=args.workers > 0)
    encoder_q = Encoder(args.arch, args.stem, args.width, args.groups, args.head_hidden, init=args.init)
    encoder_k = Encoder(args.arch, args.stem, args.width, args.groups, args.head_hidden, init=args.init)
    encoder_k.load_state_dict(encoder_q.state_dict())
    for p in encoder_k.parameters():
        p.requires_grad = False
    queue = F.normalize(torch.randn(args.queue, 128), dim=1)
    pointer = 0
    optimiser = torch.optim.SGD(encoder_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    total, step, rows = args.epochs * len(loader), 0, []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    log = open(args.out, "w")

    def monitor(epoch):
        encoder_q.eval()
        result = knn_monitor(encoder_q.backbone, args.knn_train, args.knn_val, args.image_size, torch.device("cpu"),
                             256, workers=args.workers)
        encoder_q.train()
        row = {"epoch": epoch, "step": step, "knn_top1": result["top1"], "knn_top1_k20": result["top1_k20"],
               "time": time.time()}
        rows.append(row)
        print(json.dumps(row), file=log, flush=True)
        print(json.dumps(row), flush=True)

    monitor(0)
    start = time.time()
    for epoch in range(args.epochs):
        for x_q, x_k in loader:
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in optimiser.param_groups:
                group["lr"] = lr
            q = encoder_q(x_q)
            with torch.no_grad():
                for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters()):
                    p_k.mul_(args.momentum).add_(p_q.detach(), alpha=1 - args.momentum)
                shuffle = torch.randperm(len(x_k))
                k = encoder_k(x_k[shuffle])[torch.argsort(shuffle)]
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / args.temperature
            loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            queue[pointer:pointer + len(k)] = k
            pointer = (pointer + len(k)) % args.queue
            step += 1
            if step % 20 == 0:
                speed = step * args.batch_size / (time.time() - start)
                print(f"step {step}/{total} loss {loss.item():.3f} {speed:.0f} img/s", flush=True)
        monitor(epoch + 1)
    log.close()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m maskco.bench.reference_mocov2",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--fmnist-dir", default=fmnist.DEFAULT_DIR)
    parser.add_argument("--knn-train", default="data/fmnist/train")
    parser.add_argument("--knn-val", default="data/fmnist/test")
    parser.add_argument("--out", default="runs/reference/log.jsonl")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--stem", default="cifar")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--init", choices=trunk.INITS, default="pytorch",
                        help="the convs' random init (pytorch: nn.Conv2d's default, a ResNet written from nn.Conv2d)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--head-hidden", type=int, default=0, help="0: the C5 width (MoCo's builder.py)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.06)
    parser.add_argument("--wd", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
