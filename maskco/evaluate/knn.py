"""kNN monitor: cosine k-nearest-neighbour accuracy on pooled backbone features of a labelled split.

The classifier of InstDisc (Wu et al., 2018; https://github.com/zhirongw/lemniscate.pytorch): the
backbone's globally average-pooled res5 feature, L2-normalised; each validation image takes its k most
similar train images (cosine similarity s) and every neighbour votes for its class with weight
``exp(s / temperature)``. No training, so it is cheap enough to run every few epochs of pretraining.

Under DDP no rank holds the whole memory bank (ImageNet's is 1.28M x 2048): every rank embeds its own
shard of both splits, the validation features are gathered to all ranks, each rank finds the k nearest
neighbours in its own shard of the bank, and the per-rank candidates (k per rank) are gathered and
merged into the global top k. Every rank ends with the same accuracy; memory per rank is its shard.

    python -m maskco.evaluate.knn --checkpoint runs/x/checkpoint_last.pt --train data/train --val data/val
"""
from __future__ import annotations

from maskco import tool_args

if __name__ == "__main__":  # the flags first, then torch: --help and a bad flag answer at once (tool_args)
    tool_args.run_as_main("maskco.evaluate.knn", tool_args.knn_args)

import argparse
import json

import torch
from torch import nn
from torch.nn import functional as F

import pipelines
from maskco import dist
from maskco.dist import resolve_precision
from maskco.evaluate.features import check_labels, images_and_labels, prepare_images, source_classes


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device: torch.device, precision: str = "fp32",
                     split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (L2-normalised pooled features float [N, C], labels int64 [N]) of this rank's images.

    backbone: a torchvision ResNet with ``fc = nn.Identity()`` (so its output is the pooled res5). It is
    put in eval mode for the pass and its previous mode restored, so the trainer can call this mid-run.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for step, (images, label) in enumerate(images_and_labels(loader, split)):
            images, label = images.to(device, non_blocking=True), label.to(device, non_blocking=True)
            if step == 0:
                check_labels(label, None, split)
            x = prepare_images(images)  # [N, 3, S, S]
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda" if x.is_cuda else "cpu", torch.bfloat16, enabled=precision == "bf16"):
                pooled = backbone(x)  # [N, C]
            features.append(F.normalize(pooled.float().flatten(1), dim=1))
            labels.append(label)
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError(f"the {split} loader yielded no images on rank {dist.get_rank()}")
    return torch.cat(features), torch.cat(labels)


def nearest(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
            max_elements: int = 2**26) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar bank rows of each query: (similarities [Q, k], labels [Q, k]), best first.

    bank [N, C] and queries [Q, C] are unit vectors; queries go in chunks so that one similarity matrix
    [chunk, N] holds at most ``max_elements`` (256 MB in fp32, whatever the bank size). With fewer than
    k bank rows the rest is padded with similarity -inf (a zero vote weight), so shards of any size merge.
    """
    sims, labels = [], []
    chunk = max(1, max_elements // max(bank.shape[0], 1))
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start:start + chunk] @ bank.T  # [c, N]
        top = similarity.topk(min(k, bank.shape[0]), dim=1)  # [c, k']
        sims.append(top.values)
        labels.append(bank_labels[top.indices])
    sims, labels = torch.cat(sims), torch.cat(labels)  # [Q, k']
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = F.pad(sims, (0, pad), value=float("-inf"))
        labels = F.pad(labels, (0, pad), value=0)
    return sims, labels


def vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Weighted votes: sims, labels [Q, k] -> class scores [Q, num_classes] (sum of exp(s / T) per class)."""
    weights = (sims / temperature).exp()  # [Q, k]; exp(-inf) = 0 for padding
    return torch.zeros(sims.shape[0], num_classes, device=sims.device).scatter_add_(1, labels, weights)


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[n_r, ...]`` from every rank in rank order; the n_r may differ (eval shards)."""
    if dist.get_world_size() == 1:
        return x
    sizes = dist.concat_all_gather(torch.tensor([x.shape[0]], device=x.device)).tolist()  # [W]
    padded = F.pad(x, [0, 0] * (x.dim() - 1) + [0, max(sizes) - x.shape[0]])  # [max n, ...]
    everyone = dist.concat_all_gather(padded).view(len(sizes), max(sizes), *x.shape[1:])
    return torch.cat([rows[:n] for rows, n in zip(everyone, sizes)])


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, distributed: bool = False) -> torch.Tensor:
    """Class scores [Q, num_classes] of the queries by weighted kNN over the bank.

    distributed: bank, bank_labels and queries are this rank's shards; the result holds the scores of
    every rank's queries (in rank order), computed against the union of the banks.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if not distributed:
        return vote(*nearest(bank, bank_labels, queries, k), num_classes, temperature)
    queries = _gather_rows(queries)  # [Q_all, C]
    sims, labels = nearest(bank, bank_labels, queries, k)  # [Q_all, k] from this rank's shard
    world = dist.get_world_size()
    sims = dist.concat_all_gather(sims).view(world, -1, k).permute(1, 0, 2).reshape(-1, world * k)
    labels = dist.concat_all_gather(labels).view(world, -1, k).permute(1, 0, 2).reshape(-1, world * k)
    top = sims.topk(k, dim=1)  # the global k nearest among every rank's candidates
    return vote(top.values, labels.gather(1, top.indices), num_classes, temperature)


def knn_accuracy(backbone: nn.Module, train_loader, val_loader, device: torch.device, k: int = 20,
                 temperature: float = 0.07, precision: str = "fp32", distributed: bool | None = None,
                 also: tuple = ()) -> dict:
    """kNN top-1 / top-5 accuracy (%) of val images against the train images: ``{"top1", "top5"}``, plus
    ``top1_k<k>`` for each ``(k, temperature)`` in ``also`` (the same features, another vote).

    Loaders yield ``pipelines.Batch`` (``view_q``, ``label``) or ``(images uint8 [N,3,S,S], labels [N])``.
    distributed (default: a process group exists): the loaders are per-rank shards of each split.
    """
    distributed = dist.get_world_size() > 1 if distributed is None else distributed
    bank, bank_labels = extract_features(backbone, train_loader, device, precision, "train")
    queries, query_labels = extract_features(backbone, val_loader, device, precision, "validation")
    if distributed:
        query_labels = _gather_rows(query_labels)
    num_classes = int(torch.cat([bank_labels, query_labels]).max()) + 1
    if distributed:  # the largest label any rank has seen
        count = torch.tensor(num_classes, device=bank.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        num_classes = int(count)
    scores = knn_scores(bank, bank_labels, queries, num_classes, k, temperature, distributed)  # [Q, classes]
    top = scores.topk(min(5, num_classes), dim=1).indices  # [Q, 5]
    hit = top == query_labels[:, None]
    result = {"top1": 100 * hit[:, 0].float().mean().item(), "top5": 100 * hit.any(dim=1).float().mean().item()}
    for other_k, other_t in also:
        other = knn_scores(bank, bank_labels, queries, num_classes, other_k, other_t, distributed).argmax(dim=1)
        result[f"top1_k{other_k}"] = 100 * (other == query_labels).float().mean().item()
    return result


def knn_monitor(backbone: nn.Module, train_source: str, val_source: str, image_size: int, device: torch.device,
                batch_size: int, workers: int | None = None, rank: int = 0, world_size: int = 1, *,
                backend: str = "torch", k: int = 200, temperature: float = 0.1, precision: str = "auto",
                also: tuple = ((20, 0.07),)) -> dict:
    """The pretrainer's periodic kNN check: ``{"top1", "top5", "top1_k20"}`` (%) on ``val_source`` against
    ``train_source``: k = 200, t = 0.1 (InstDisc's and MoCo's CIFAR demo's monitor), and k = 20, t = 0.07
    from the same features (``also``).

    Both splits are read once in evaluation mode (resize + centre crop, every image once), each rank
    embedding its shard; all ranks must call it (collectives inside) and all get the same numbers.
    batch_size: images per rank per step. precision auto: bf16 on GPU, fp32 on CPU. A subset list (.txt)
    of the train split keeps it quick on large datasets.
    """
    device = torch.device(device)
    for source, split in ((train_source, "knn train"), (val_source, "knn val")):
        source_classes(source, split)  # unlabelled -> a clear error before any decoding
    precision = resolve_precision(precision, device)
    loaders = [pipelines.build_loader(backend, source, batch_size=batch_size, image_size=image_size, device=device,
                                      rank=rank, world_size=world_size, workers=workers, eval_mode=True)
               for source in (train_source, val_source)]
    try:
        return knn_accuracy(backbone, *loaders, device, k, temperature, precision, distributed=world_size > 1,
                            also=also)
    finally:  # the trainer calls this every few epochs: its workers must not outlive the call
        for loader in loaders:
            loader.close()


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (``tool_args.knn_args``) and :func:`run`: the kNN record."""
    return run(tool_args.knn_args(argv))


def run(args: argparse.Namespace) -> dict:
    """kNN accuracy of the backbone ``args`` name; rank 0 prints the record (and writes ``--out``)."""
    from maskco.export import backbone_from_args

    info = dist.init_distributed(None if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    backbone = backbone_from_args(args)
    result = knn_monitor(backbone.to(info.device), args.train, args.val, args.image_size, info.device,
                         args.batch_size, args.workers, info.rank, info.world_size, backend=args.backend,
                         k=args.k, temperature=args.temperature, precision=args.precision,
                         also=() if args.k == 20 else ((20, 0.07),))
    record = {"checkpoint": args.checkpoint or f"random init ({args.arch})", "k": args.k,
              "temperature": args.temperature, "image_size": args.image_size,
              **{f"knn_{key}": value for key, value in result.items()}}
    if info.rank == 0:
        print(json.dumps(record))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=1)
    dist.shutdown()
    return record

