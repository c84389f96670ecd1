"""Scenes with boxes: uncurated many-object images of Fashion-MNIST garments, with COCO annotations.

The paper's claim is about pretraining on images with many objects (COCO, Conceptual Captions) and then
detecting them. A scene is an RGB canvas (64 px by default) on a textured background with 1 to 6
garments, each a Fashion-MNIST item resized to 12-40 px (its 28 px image, bilinear), tinted with a colour
of its own and pasted at a random position; a garment may cover part of an earlier one, but no two
garments' boxes overlap by more than IoU 0.3 and every garment keeps at least half of its pixels in
sight. Each garment's box is tight around its visible pixels (the resized item above ``INK`` grey
levels, minus what later garments cover), its category its Fashion-MNIST class. Three splits, each from
its own items:

    out_dir/pretrain/scene_000123.png     unlabelled pretraining scenes   (train items 0..50k of a permutation)
    out_dir/pretrain_labels.txt           "pretrain/scene_000123.png MASK": the classes present, as a bit mask
                                          (the supervised arm's multi-label targets; self-supervision ignores it)
    out_dir/train/, annotations/instances_train.json   detection train scenes (the other 10k train items)
    out_dir/test/,  annotations/instances_test.json    detection test scenes (test items)

The annotation files are COCO's instances format (what pycocotools, torchvision and detectron2 read):
``bbox`` is ``[x, y, w, h]`` in pixels, ``area`` the visible pixel count, categories 1..10. The folder is
COCO's own layout, so ``maskco.evaluate.detect --data out_dir`` reads it as it reads COCO 2017.

Every draw comes from ``numpy.random.default_rng(seed)`` (one stream per split), so the same settings
give the same files; as in ``pipelines.fmnist``, files are written to a staging folder renamed into
place with a marker JSON of the settings written last, and a second call with the same settings reuses
the folder.

    python -m pipelines.scenes data/scenes --pretrain 20000 --train 4000 --test 1000
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

from pipelines.fmnist import CLASSES, DEFAULT_DIR, load_split, publish
from pipelines.sources import DataError

CANVAS = 64  # px: a scene's side (the CPU preset; --canvas for larger)
ITEMS = (1, 6)  # garments per scene, uniform
SCALE = (12, 40)  # px: a garment's side at a 64 px canvas (scaled with the canvas)
MAX_IOU = 0.3  # two garments' boxes overlap at most this much
MIN_VISIBLE = 0.5  # a garment keeps at least this share of its pixels in sight
INK = 24  # grey level (of 255) above which a pixel of the resized item belongs to the garment
TRIES = 30  # placements tried per garment before the scene keeps fewer garments
PRETRAIN_POOL = 50000  # train items for pretraining scenes; the rest of the train split is detection's
MARKER = "scenes.json"
SPLITS = ("pretrain", "train", "test")
FORMAT_VERSION = 1  # bump when what is written changes, so old folders are rebuilt


def category_names() -> list[str]:
    """The 10 Fashion-MNIST class names, COCO category k + 1 for class k ("0_tshirt_top" -> "tshirt_top")."""
    return [name.split("_", 1)[1] for name in CLASSES]


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background, float32 [size, size, 3] in 0..255: a random base colour, a smooth random
    field (an 8 x 8 grid upsampled) and fine grain, so that a garment is not found by thresholding."""
    base = rng.uniform(0, 150, size=3)  # [3]
    coarse = rng.normal(0, 30, size=(8, 8, 3)).astype(np.float32)  # [8, 8, 3]
    smooth = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.BICUBIC))
                       for c in range(3)], axis=-1)  # [size, size, 3]
    grain = rng.normal(0, 8, size=(size, size, 1))  # [size, size, 1]: the same grain on every channel
    return np.clip(base + smooth + grain, 0, 255).astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box [4] with each of ``boxes`` [K, 4] -> [K]."""
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def tight_box(mask: np.ndarray) -> list[int]:
    """A boolean mask [H, W] with at least one pixel -> xyxy [x0, y0, x1, y1] (x1, y1 exclusive) whose four
    borders each pass through a pixel of the mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def compose(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int = CANVAS):
    """One scene from candidate garments ``items`` uint8 [K, 28, 28] (K = the scene's garment count, their
    ``labels`` [K]) -> (image uint8 [size, size, 3], boxes int [J, 4] xyxy, labels [J], masks bool [J, size,
    size]: each kept garment's visible pixels), J <= K: a garment that finds no place within the overlap
    bounds after ``TRIES`` draws is left out."""
    canvas = background(rng, size)
    scale = size / CANVAS
    lo, hi = max(4, round(SCALE[0] * scale)), min(size, round(SCALE[1] * scale))
    masks, kept = [], []
    for item, label in zip(items, labels):
        for _ in range(TRIES):
            side = int(rng.integers(lo, hi + 1))
            grey = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), dtype=np.float32)
            ink = grey > INK
            if not ink.any():
                break  # an empty item at this size: nothing to place
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            mask = np.zeros((size, size), dtype=bool)
            mask[y:y + side, x:x + side] = ink
            box = np.array(tight_box(mask), dtype=np.float32)
            if masks and _iou(box, np.array([tight_box(m) for m in masks], dtype=np.float32)).max() > MAX_IOU:
                continue
            covered = [m & ~mask for m in masks]  # what each earlier garment keeps in sight
            if any(c.sum() < MIN_VISIBLE * m.sum() for c, m in zip(covered, masks)):
                continue
            tint = rng.uniform(0.35, 1.0, size=3)  # [3]: the garment's colour; its shading is the item's grey
            alpha = np.clip(grey / 64.0, 0, 1)[..., None] * ink[..., None]  # [side, side, 1]
            patch = canvas[y:y + side, x:x + side]
            canvas[y:y + side, x:x + side] = patch * (1 - alpha) + (grey[..., None] * tint) * alpha
            masks = [*covered, mask]
            kept.append(label)
            break
    boxes = np.array([tight_box(m) for m in masks], dtype=np.int64).reshape(-1, 4)
    masks = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
    return canvas.round().astype(np.uint8), boxes, np.array(kept, dtype=np.int64), masks


def split_items(train_count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Which train items each split draws from: a permutation's first ``PRETRAIN_POOL`` (or 5/6) for
    pretraining, the rest for detection training; disjoint."""
    order = rng.permutation(train_count)
    cut = min(PRETRAIN_POOL, train_count * 5 // 6)
    return {"pretrain": order[:cut], "train": order[cut:]}


def draw_scenes(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, count: int, rng: np.random.Generator,
                size: int = CANVAS):
    """``count`` scenes of items from ``pool`` (indices into images [N, 28, 28]), each item used once before
    any twice; yields (image, boxes, labels, item indices) per scene."""
    sizes = rng.integers(ITEMS[0], ITEMS[1] + 1, size=count)  # [count]
    rounds = -(-int(sizes.sum()) // len(pool))  # ceil
    order = np.concatenate([pool[rng.permutation(len(pool))] for _ in range(rounds)])
    start = 0
    for n in sizes:
        picked = order[start:start + n]
        start += n
        image, boxes, kept, _ = compose(images[picked], labels[picked], rng, size)
        yield image, boxes, kept, picked


def coco_record(name: str, image_id: int, size: int, boxes: np.ndarray, labels: np.ndarray, next_id: int):
    """(COCO image entry, annotation entries) of one scene; annotation ids from ``next_id``."""
    image = {"id": image_id, "file_name": name, "width": size, "height": size}
    annotations = [{"id": next_id + k, "image_id": image_id, "category_id": int(label) + 1,
                    "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)], "area": int((x1 - x0) * (y1 - y0)),
                    "iscrowd": 0} for k, ((x0, y0, x1, y1), label) in enumerate(zip(boxes, labels))]
    return image, annotations


def write_scenes(out_dir: str, fmnist_dir: str = DEFAULT_DIR, pretrain: int = 20000, train: int = 4000,
                 test: int = 1000, size: int = CANVAS, seed: int = 0) -> dict[str, str]:
    """Write (or reuse) the three splits under ``out_dir``; -> {"root", "pretrain", "pretrain_labels", "train",
    "test", "train_annotations", "test_annotations"}: their paths."""
    for name, value in (("pretrain", pretrain), ("train", train), ("test", test)):
        if value < 1:
            raise ValueError(f"{name} scenes must be >= 1, got {value}")
    if not 32 <= size <= 1024:
        raise ValueError(f"canvas must be 32..1024 px, got {size}")
    settings = {"version": FORMAT_VERSION, "pretrain": int(pretrain), "train": int(train), "test": int(test),
                "canvas": int(size), "seed": int(seed)}

    def fill(staging: str) -> None:
        train_images, train_labels = load_split(fmnist_dir, "train")
        test_images, test_labels = load_split(fmnist_dir, "t10k")
        pools = split_items(len(train_images), np.random.default_rng([seed, 0]))
        sources = {"pretrain": (train_images, train_labels, pools["pretrain"]),
                   "train": (train_images, train_labels, pools["train"]),
                   "test": (test_images, test_labels, np.arange(len(test_images)))}
        categories = [{"id": k + 1, "name": name, "supercategory": "garment"}
                      for k, name in enumerate(category_names())]
        os.makedirs(os.path.join(staging, "annotations"))
        for index, split in enumerate(SPLITS):
            images, labels, pool = sources[split]
            count = {"pretrain": pretrain, "train": train, "test": test}[split]
            os.makedirs(os.path.join(staging, split))
            entries, annotations, listing = [], [], []
            scenes = draw_scenes(images, labels, pool, count, np.random.default_rng([seed, index + 1]), size)
            for number, (image, boxes, kept, _) in enumerate(scenes):
                name = f"scene_{number:06d}.png"
                Image.fromarray(image).save(os.path.join(staging, split, name))
                entry, annotation = coco_record(name, number + 1, size, boxes, kept, len(annotations) + 1)
                entries.append(entry)
                annotations.extend(annotation)
                listing.append(f"{split}/{name} {sum(1 << int(c) for c in set(kept.tolist()))}")
            if split == "pretrain":
                with open(os.path.join(staging, "pretrain_labels.txt"), "w", encoding="utf-8") as handle:
                    handle.write("\n".join(listing) + "\n")
            else:
                with open(os.path.join(staging, "annotations", f"instances_{split}.json"), "w",
                          encoding="utf-8") as handle:
                    json.dump({"info": {"description": f"MaskCo scenes, {split} split", "canvas": size,
                                        "seed": seed},
                               "images": entries, "annotations": annotations, "categories": categories}, handle)

    root = publish(out_dir, fmnist_dir, MARKER, settings, fill)
    return {"root": root, **{split: os.path.join(root, split) for split in SPLITS},
            "pretrain_labels": os.path.join(root, "pretrain_labels.txt"),
            **{f"{split}_annotations": os.path.join(root, "annotations", f"instances_{split}.json")
               for split in ("train", "test")}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.scenes", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="data/scenes",
                        help="where to write (reused when the settings match)")
    parser.add_argument("--fmnist-dir", default=DEFAULT_DIR,
                        help=f"folder of the IDX .gz files (default {DEFAULT_DIR})")
    parser.add_argument("--pretrain", type=int, default=20000, help="unlabelled pretraining scenes (default 20000)")
    parser.add_argument("--train", type=int, default=4000, help="detection train scenes (default 4000)")
    parser.add_argument("--test", type=int, default=1000, help="detection test scenes (default 1000)")
    parser.add_argument("--canvas", type=int, default=CANVAS, help=f"a scene's side in px (default {CANVAS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        written = write_scenes(args.out_dir, args.fmnist_dir, args.pretrain, args.train, args.test, args.canvas,
                               args.seed)
    except (DataError, ValueError, OSError) as error:
        print(f"pipelines.scenes: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
