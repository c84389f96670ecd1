"""2 x 2 mosaics of Fashion-MNIST items: a multi-object pretraining set and the region probe's sets.

A mosaic is 56 x 56 grey: four 28 px items (``pipelines.fmnist``'s IDX images, as they come) in a 2 x 2
grid, item k at row ``k // 2``, column ``k % 2`` (:func:`item_boxes`). It is the paper's uncurated,
several-objects-per-image setting (COCO) in small. Two writers, each owning its ``out_dir``:

    write_pretrain_mosaics(out_dir)    out_dir/pretrain/mosaic_000123.png   unlabelled, train items
    write_probe_sets(out_dir)          out_dir/bank.npz                     train items (kNN bank)
                                       out_dir/query.npz                    test items (kNN queries)

The pretraining set is PNGs in a flat folder because the loaders read folders. The probe sets are one
``.npz`` each (:func:`load_probe_set`): ``images`` uint8 [M, 56, 56], ``labels`` int64 [M, 4] and
``items`` int64 [M, 4] (each item's label and index in its IDX split, slot-major as in ``item_boxes``),
``boxes`` float32 [4, 4] (xyxy in mosaic pixels, the same grid in every mosaic) and ``split``. The probe
reads a whole set as arrays in one go (no decode loop over thousands of files), and labels and boxes
cannot be separated from their images.

Bank items come from the train split and query items from the test split, so they are disjoint; within a
set every item appears once, in a class-balanced draw. The pretraining mosaics use every train item
once before any twice (concatenated permutations; they may share items with the bank, as a kNN monitor's
bank is usually part of the pretraining data, but never with the queries). Every draw comes from
``numpy.random.default_rng(seed)``; as in ``pipelines.fmnist``, files are written to a staging folder
renamed into place, a marker JSON of the settings is written last, and a second call with the same
settings reuses the folder.

    python -m pipelines.mosaics data/mosaics --pretrain 3840
    python -m pipelines.mosaics data/mosaic_probe --bank 2500 --query 500
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

from pipelines.fmnist import DEFAULT_DIR, balanced, load_split, publish
from pipelines.sources import DataError

ITEM = 28  # px: a Fashion-MNIST image
GRID = 2  # items per side
SIZE = GRID * ITEM  # 56 px: a mosaic's side
SLOTS = GRID * GRID  # items per mosaic
MARKER = "mosaics.json"
PROBE_FILES = ("bank", "query")
FORMAT_VERSION = 1  # bump when what is written changes, so old folders are rebuilt


def item_boxes() -> np.ndarray:
    """Where each slot's item lies: float32 [4, 4] xyxy in mosaic pixels, slot k at row k // 2, column k % 2."""
    rows, cols = np.divmod(np.arange(SLOTS), GRID)  # [4], [4]
    return (np.stack([cols, rows, cols + 1, rows + 1], axis=1) * ITEM).astype(np.float32)  # [4, 4]


def compose(images: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Items ``[M, 4]`` (indices into images ``[N, 28, 28]``) -> mosaics uint8 ``[M, 56, 56]`` (item_boxes' slots)."""
    tiles = images[items]  # [M, 4, 28, 28]
    grid = tiles.reshape(len(items), GRID, GRID, ITEM, ITEM)  # [M, row, col, y, x]
    return grid.transpose(0, 1, 3, 2, 4).reshape(len(items), SIZE, SIZE)  # [M, row*y, col*x]


def cycled_items(population: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` mosaics' items ``[count, 4]`` from ``population`` items: each used once before any twice."""
    rounds = -(-count * SLOTS // population)  # ceil
    order = np.concatenate([rng.permutation(population) for _ in range(rounds)])
    return order[:count * SLOTS].reshape(count, SLOTS)


def distinct_items(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` mosaics' items ``[count, 4]``: distinct items, class-balanced, in random slots."""
    if not 1 <= count * SLOTS <= len(labels):
        raise ValueError(f"{count} mosaics need {count * SLOTS} distinct items; the split has {len(labels)} "
                         f"(use 1..{len(labels) // SLOTS} mosaics)")
    picked = balanced(labels, count * SLOTS, rng.permutation(len(labels)))  # sorted
    return rng.permutation(picked).reshape(count, SLOTS)


def write_pretrain_mosaics(out_dir: str, fmnist_dir: str = DEFAULT_DIR, count: int = 3840, seed: int = 0) -> str:
    """Write (or reuse) ``count`` unlabelled mosaics of train items; -> the flat PNG folder ``out_dir/pretrain``."""
    if count < 1:
        raise ValueError(f"pretrain mosaics must be >= 1, got {count}")
    settings = {"version": FORMAT_VERSION, "kind": "pretrain", "count": int(count), "seed": int(seed)}

    def fill(staging: str) -> None:
        images, _ = load_split(fmnist_dir, "train")
        mosaics = compose(images, cycled_items(len(images), count, np.random.default_rng(seed)))
        folder = os.path.join(staging, "pretrain")
        os.makedirs(folder)
        for index, mosaic in enumerate(mosaics):
            Image.fromarray(mosaic).save(os.path.join(folder, f"mosaic_{index:06d}.png"))

    out_dir = publish(out_dir, fmnist_dir, MARKER, settings, fill)
    return os.path.join(out_dir, "pretrain")


def write_probe_sets(out_dir: str, fmnist_dir: str = DEFAULT_DIR, bank: int = 2500, query: int = 500,
                     seed: int = 0) -> dict[str, str]:
    """Write (or reuse) the region probe's sets: ``bank`` mosaics of train items and ``query`` mosaics of test
    items; -> {"bank", "query"}: their ``.npz`` paths (:func:`load_probe_set`)."""
    for name, value in (("bank", bank), ("query", query)):
        if value < 1:
            raise ValueError(f"{name} mosaics must be >= 1, got {value}")
    settings = {"version": FORMAT_VERSION, "kind": "probe", "bank": int(bank), "query": int(query), "seed": int(seed)}

    def fill(staging: str) -> None:
        rng = np.random.default_rng(seed)
        for name, split, count in (("bank", "train", bank), ("query", "t10k", query)):
            images, labels = load_split(fmnist_dir, split)
            items = distinct_items(labels, count, rng)  # [count, 4]
            np.savez_compressed(os.path.join(staging, f"{name}.npz"), images=compose(images, items),
                                labels=labels[items].astype(np.int64), items=items.astype(np.int64),
                                boxes=item_boxes(), split=np.array(split))

    out_dir = publish(out_dir, fmnist_dir, MARKER, settings, fill)
    return {name: os.path.join(out_dir, f"{name}.npz") for name in PROBE_FILES}


def load_probe_set(path: str) -> dict[str, np.ndarray]:
    """A probe set written by :func:`write_probe_sets` -> {"images", "labels", "items", "boxes", "split"}."""
    try:
        with np.load(path) as data:
            probe = {key: data[key] for key in ("images", "labels", "items", "boxes", "split")}
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"{path} is not a probe set of pipelines.mosaics.write_probe_sets ({error})") from None
    m = len(probe["images"])
    if (probe["images"].dtype != np.uint8 or probe["images"].ndim != 3 or probe["labels"].shape != (m, SLOTS)
            or probe["boxes"].shape != (SLOTS, 4)):
        raise DataError(f"{path}: expected images uint8 [M, H, W], labels [M, {SLOTS}] and boxes [{SLOTS}, 4], got "
                        f"{probe['images'].dtype} {list(probe['images'].shape)}, {list(probe['labels'].shape)} "
                        f"and {list(probe['boxes'].shape)}")
    return probe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.mosaics", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where to write (reused when the settings match)")
    parser.add_argument("--fmnist-dir", default=DEFAULT_DIR,
                        help=f"folder of the IDX .gz files (default {DEFAULT_DIR})")
    parser.add_argument("--pretrain", type=int, help="write this many unlabelled pretraining mosaics")
    parser.add_argument("--bank", type=int, help="write the probe sets: this many bank mosaics (train items)")
    parser.add_argument("--query", type=int, default=500, help="query mosaics (test items) with --bank (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.pretrain is None) == (args.bank is None):
        parser.error("give exactly one of --pretrain N (pretraining folder) or --bank N (probe sets)")
    try:
        if args.pretrain is not None:
            written = {"pretrain": write_pretrain_mosaics(args.out_dir, args.fmnist_dir, args.pretrain, args.seed)}
        else:
            written = write_probe_sets(args.out_dir, args.fmnist_dir, args.bank, args.query, args.seed)
    except (DataError, ValueError) as error:
        print(f"pipelines.mosaics: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
