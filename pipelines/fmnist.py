"""Fashion-MNIST as image folders the loaders read: the data of ``make quality`` (maskco/quality.py).

Fashion-MNIST (Xiao et al., 2017) is 70,000 real product photographs of garments, 28 x 28 grey, 10
classes; Debian ships it as ``dataset-fashion-mnist`` (the standard IDX ``.gz`` files under
``/usr/share/datasets/fashion-mnist/``). This module reads the IDX files itself (gzip + numpy, no
torchvision dataset, no download) and writes three deterministic splits under ``out_dir``:

    pretrain/<k_class>/train_012345.png  pretraining images (labels unused by self-supervision; the
                                         supervised ceiling of make quality reads them): train images
    train/<k_class>/train_054321.png     labelled (kNN bank, linear training): other train images
    test/<k_class>/t10k_01234.png        labelled, from the 10k test images (kNN queries, linear top-1)

Images are stored as they come, 28 x 28 grey PNG (lossless, ~300 bytes each); the torch loader
converts to RGB and upsamples each view (bilinear) to the view size, so nothing is invented at write
time and one folder serves every view size (96 px for ResNet-18 at C5 3 x 3, 224 px for ResNet-50).
The labelled splits are the first images in the release's order (the usual kNN monitor's bank and
queries; Fashion-MNIST's order is shuffled, so they are near-balanced); pretrain and train are disjoint
whenever the train images left over by pretrain hold the labelled split. Every draw comes from
``numpy.random.default_rng(seed)``, so the same settings give the same files; a marker file written
last (``fmnist_splits.json``) holds the settings, and a second call with the same settings reuses the
folders.

    python -m pipelines.fmnist data/fmnist --pretrain 3840 --train 2000 --test 1000
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import sys

import numpy as np
from PIL import Image

from pipelines.sources import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install -y --no-install-recommends dataset-fashion-mnist"
FILES = {  # split -> (images, labels), as the package (and the original release) names them
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt",
           "7_sneaker", "8_bag", "9_ankle_boot")  # the digit keeps ImageFolder's sorted order = label order
MARKER = "fmnist_splits.json"
FORMAT_VERSION = 3  # bump when what is written changes, so old folders are rebuilt (2: labelled pretrain;
# 3: labelled splits = the first images in the release's order)


class FashionMNISTMissing(DataError):
    """The IDX files are not where they were looked for; the message says how to install them."""


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip-compressed if it ends in .gz) -> uint8 array of its shape ([N] or [N, H, W]).

    IDX: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each
    dimension as a big-endian int32, then the data in row-major order.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes), file holds {body.size}")
    return body.reshape(shape)


def load_split(fmnist_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of ``split`` ("train" or "t10k")."""
    paths = [os.path.join(fmnist_dir, name) for name in FILES[split]]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FashionMNISTMissing(f"Fashion-MNIST not found ({missing[0]} is missing); install it with "
                                  f"`{INSTALL}` or point --fmnist-dir at a folder holding the IDX .gz files")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{paths[0]} / {paths[1]}: expected images [N, H, W] and labels [N], "
                        f"got {list(images.shape)} and {list(labels.shape)}")
    if labels.max(initial=0) >= len(CLASSES):
        raise DataError(f"{paths[1]} has label {labels.max()}; Fashion-MNIST has {len(CLASSES)} classes")
    return images, labels


def balanced(labels: np.ndarray, count: int, order: np.ndarray) -> np.ndarray:
    """Up to ``count`` indices from ``order`` (indices into labels, in the order to take them), as equal
    a share per class as ``count`` allows (fewer if order runs out). Sorted."""
    classes = np.unique(labels)
    quota = {c: count // len(classes) + (i < count % len(classes)) for i, c in enumerate(classes)}
    picked = []
    for index in order:
        if quota[labels[index]] > 0:
            quota[labels[index]] -= 1
            picked.append(index)
            if len(picked) == count:
                break
    return np.sort(np.array(picked, dtype=np.int64))


def choose(train_labels: np.ndarray, test_labels: np.ndarray, pretrain: int, train: int, test: int,
           seed: int) -> dict[str, np.ndarray]:
    """Indices of each split: pretrain = the head of one permutation of the train set; train = the first
    ``train`` train images (the release's order) that pretrain leaves out or, where those are too few, the
    first ``train`` of all; test = the first ``test`` test images. The labelled splits are those of the
    usual kNN monitor (and of the reference curve in BENCHMARKS.md: the first 10,000 / 2,000), the same
    for every pretraining size and seed."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_labels))
    left = np.ones(len(train_labels), dtype=bool)
    left[order[:pretrain]] = False
    labelled = np.flatnonzero(left)[:train]
    if len(labelled) < train:  # pretrain takes (nearly) everything: the labelled split overlaps it
        labelled = np.arange(train)
    return {"pretrain": np.sort(order[:pretrain]), "train": labelled, "test": np.arange(test)}


def _check(pretrain: int, train: int, test: int, sizes: tuple[int, int]) -> None:
    for name, value, limit in (("pretrain", pretrain, sizes[0]), ("train", train, sizes[0]), ("test", test, sizes[1])):
        if not 1 <= value <= limit:
            raise ValueError(f"{name} images must be in 1..{limit}, got {value}")
    if min(train, test) < len(CLASSES):
        raise ValueError(f"train and test need at least one image per class ({len(CLASSES)})")


def write_splits(out_dir: str, fmnist_dir: str = DEFAULT_DIR, pretrain: int = 3840, train: int = 2000,
                 test: int = 1000, seed: int = 0) -> dict[str, str]:
    """Write (or reuse) the three splits under ``out_dir``; -> {"pretrain", "train", "test"}: their folders."""
    settings = {"version": FORMAT_VERSION, "pretrain": int(pretrain), "train": int(train), "test": int(test),
                "seed": int(seed)}

    def fill(staging: str) -> None:
        train_images, train_labels = load_split(fmnist_dir, "train")
        test_images, test_labels = load_split(fmnist_dir, "t10k")
        _check(pretrain, train, test, (len(train_images), len(test_images)))
        picks = choose(train_labels, test_labels, pretrain, train, test, seed)
        for split, (images, labels, prefix) in {"pretrain": (train_images, train_labels, "train"),
                                               "train": (train_images, train_labels, "train"),
                                               "test": (test_images, test_labels, "t10k")}.items():
            for index in picks[split]:
                folder = os.path.join(staging, split, *([] if labels is None else [CLASSES[labels[index]]]))
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(images[index]).save(os.path.join(folder, f"{prefix}_{index:05d}.png"))

    out_dir = publish(out_dir, fmnist_dir, MARKER, settings, fill)
    return {split: os.path.join(out_dir, split) for split in ("pretrain", "train", "test")}


def publish(out_dir: str, fmnist_dir: str, marker: str, settings: dict, fill) -> str:
    """``fill(staging)`` writes the files into a sibling staging folder, the ``marker`` JSON of ``settings``
    (plus the source files' sizes) goes in last, and the folder is renamed into place: an interrupted run
    never leaves a folder that looks complete. Skipped when ``out_dir``'s marker already holds these
    settings; a non-empty folder without our marker is refused. A symlinked ``out_dir`` is rewritten where
    it points (the link stays). -> ``out_dir``, absolute."""
    out_dir = os.path.realpath(os.path.expanduser(out_dir))
    fmnist_dir = os.path.abspath(os.path.expanduser(fmnist_dir))
    settings = {**settings, "source": _describe_source(fmnist_dir)}
    previous = read_marker(out_dir, marker)
    if previous == settings:
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir) and previous is None:
        raise ValueError(f"{out_dir} is not empty and holds no {marker}; pick a new or empty folder")
    staging = f"{out_dir}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        fill(staging)
        with open(os.path.join(staging, marker), "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=1)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(out_dir)  # ours (it holds our marker), written with other settings
    elif os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.replace(staging, out_dir)
    return out_dir


def _describe_source(fmnist_dir: str) -> dict:
    """Names and sizes of the IDX files (so a different copy of the data rebuilds the folders)."""
    files = [name for pair in FILES.values() for name in pair]
    return {"dir": fmnist_dir, "bytes": [os.path.getsize(os.path.join(fmnist_dir, name))
                                         if os.path.isfile(os.path.join(fmnist_dir, name)) else None
                                         for name in files]}


def read_marker(out_dir: str, marker: str = MARKER):
    """The settings a writer left in ``out_dir/marker`` (written last), or None where there is none."""
    try:
        with open(os.path.join(out_dir, marker), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.fmnist", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="data/fmnist", help="where to write the splits (reused)")
    parser.add_argument("--fmnist-dir", default=DEFAULT_DIR,
                        help=f"folder of the IDX .gz files (default {DEFAULT_DIR})")
    parser.add_argument("--pretrain", type=int, default=3840, help="unlabelled pretraining images (default 3840)")
    parser.add_argument("--train", type=int, default=2000, help="labelled train images (default 2000)")
    parser.add_argument("--test", type=int, default=1000, help="labelled test images (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        folders = write_splits(args.out_dir, args.fmnist_dir, args.pretrain, args.train, args.test, args.seed)
    except (DataError, ValueError) as error:
        print(f"pipelines.fmnist: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
