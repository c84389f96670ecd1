"""Detection datasets for ``maskco.evaluate.detect``: a COCO-JSON folder or Pascal VOC, as one record.

Two layouts are read, both into :class:`DetectionSet` (image paths, per image the boxes xyxy in pixels and
the contiguous labels 1..C, and a COCO ground truth for pycocotools):

- **COCO** (``pipelines.scenes``' folders, COCO 2017, any COCO-JSON set): ``DATA/annotations/instances_<split>.json``
  and the images in ``DATA/<split>/``. Categories keep their ids in the ground truth; the detector's labels are
  their rank (COCO's 1..90 with gaps -> 1..80).
- **VOC** (torchvision's ``VOCDetection`` layout): ``DATA/VOCdevkit/VOC<year>/`` (or ``DATA/VOC<year>/``) with
  ``Annotations/*.xml``, ``ImageSets/Main/<set>.txt`` and ``JPEGImages/``; a split is ``2007-trainval`` or
  several joined by ``+`` (``2007-trainval+2012-trainval``, the paper's VOC07+12). Boxes are shifted from
  VOC's 1-based pixels as detectron2 does; objects marked ``difficult`` are kept in the ground truth as
  ``iscrowd`` (pycocotools then neither rewards nor punishes detecting them) and left out of training.

A folder without annotations, an unknown split, or a split without a single usable image is a
``DataError``: one line, exit 2.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

import torch
from PIL import Image

from pipelines.sources import DataError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
FORMATS = ("auto", "coco", "voc")


@dataclass
class DetectionSet:
    """One split: ``paths[i]`` with ``boxes[i]`` float32 [K, 4] xyxy pixels and ``labels[i]`` int64 [K] in 1..C
    (training targets; crowd and difficult objects left out), ``image_ids[i]`` its id in ``coco`` (the
    pycocotools ground truth as a dict), ``category_ids[c - 1]`` the category of label c."""

    paths: list[str]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    image_ids: list[int]
    category_ids: list[int]
    category_names: list[str]
    coco: dict
    source: str  # what was read, for messages and the results record
    eval_paths: list[str]  # every image of the split (those without objects too), for evaluation
    eval_ids: list[int]

    def __len__(self) -> int:
        return len(self.paths)


def detect_format(data: str) -> str:
    """``coco`` where ``data/annotations`` exists, ``voc`` where a ``VOC<year>`` folder does; else DataError."""
    if not os.path.isdir(data):
        raise DataError(f"detection data {data} is not a folder")
    if os.path.isdir(os.path.join(data, "annotations")):
        return "coco"
    if _voc_years(data):
        return "voc"
    raise DataError(f"{data} holds no detection annotations: expected annotations/instances_<split>.json (COCO "
                    "layout, e.g. python -m pipelines.scenes) or VOCdevkit/VOC<year>/Annotations (Pascal VOC)")


def load_split(data: str, split: str, fmt: str = "auto") -> DetectionSet:
    """Read one split of ``data`` in ``fmt`` (auto: :func:`detect_format`)."""
    fmt = detect_format(data) if fmt == "auto" else fmt
    dataset = read_coco(data, split) if fmt == "coco" else read_voc(data, split)
    if not len(dataset):
        raise DataError(f"{dataset.source}: the split has no image with an object to detect")
    missing = next((path for path in dataset.eval_paths if not os.path.isfile(path)), None)
    if missing:
        raise DataError(f"{dataset.source}: image {missing} is missing")
    return dataset


# ---- COCO

def read_coco(data: str, split: str) -> DetectionSet:
    path = os.path.join(data, "annotations", f"instances_{split}.json")
    if not os.path.isfile(path):
        found = sorted(name[len("instances_"):-len(".json")] for name in _listdir(os.path.join(data, "annotations"))
                       if name.startswith("instances_") and name.endswith(".json"))
        raise DataError(f"{path} does not exist (splits with annotations here: {', '.join(found) or 'none'})")
    try:
        with open(path, encoding="utf-8") as handle:
            coco = json.load(handle)
        images, annotations, categories = coco["images"], coco["annotations"], coco["categories"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a COCO instances file ({type(error).__name__}: {error})") from None
    category_ids = sorted(c["id"] for c in categories)
    names = {c["id"]: c["name"] for c in categories}
    label_of = {cid: rank + 1 for rank, cid in enumerate(category_ids)}
    objects: dict[int, list] = {}
    for annotation in annotations:
        x, y, w, h = annotation["bbox"]
        if annotation.get("iscrowd", 0) or w <= 0 or h <= 0:
            continue
        objects.setdefault(annotation["image_id"], []).append(([x, y, x + w, y + h],
                                                               label_of[annotation["category_id"]]))
    folder = os.path.join(data, split)
    entries = [image for image in images if objects.get(image["id"])]
    return _dataset([os.path.join(folder, image["file_name"]) for image in entries],
                    [objects[image["id"]] for image in entries], [image["id"] for image in entries],
                    category_ids, [names[c] for c in category_ids], coco, path,
                    [os.path.join(folder, image["file_name"]) for image in images], [image["id"] for image in images])


# ---- VOC

def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _voc_years(data: str) -> dict[str, str]:
    """``{"2007": folder of VOC2007, ...}`` under ``data`` or ``data/VOCdevkit``."""
    years = {}
    for root in (data, os.path.join(data, "VOCdevkit")):
        for name in _listdir(root):
            if name.startswith("VOC") and name[3:].isdigit() and os.path.isdir(os.path.join(root, name, "Annotations")):
                years[name[3:]] = os.path.join(root, name)
    return years


def read_voc(data: str, split: str) -> DetectionSet:
    years = _voc_years(data)
    paths, objects, ids, coco_images, coco_annotations, every = [], [], [], [], [], []
    for part in split.split("+"):
        year, _, image_set = part.partition("-")
        if year not in years or not image_set:
            known = ", ".join(sorted(years)) or "none"
            raise DataError(f"VOC split {part!r}: expected YEAR-SET with a year of {known} "
                            f"under {data} (e.g. 2007-trainval+2012-trainval, 2007-test)")
        listing = os.path.join(years[year], "ImageSets", "Main", f"{image_set}.txt")
        try:
            with open(listing, encoding="utf-8") as handle:
                names = handle.read().split()
        except OSError as error:
            raise DataError(f"VOC split {part!r}: cannot read {listing} ({error.strerror})") from None
        for name in names:
            image_id = len(coco_images) + 1
            boxes, width, height = _voc_objects(os.path.join(years[year], "Annotations", f"{name}.xml"))
            coco_images.append({"id": image_id, "file_name": f"{year}/{name}.jpg", "width": width, "height": height})
            every.append(os.path.join(years[year], "JPEGImages", f"{name}.jpg"))
            for (x0, y0, x1, y1), label, difficult in boxes:
                coco_annotations.append({"id": len(coco_annotations) + 1, "image_id": image_id, "category_id": label,
                                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                         "iscrowd": int(difficult)})
            kept = [(box, label) for box, label, difficult in boxes if not difficult]
            if kept:
                paths.append(every[-1])
                objects.append(kept)
                ids.append(image_id)
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(VOC_CLASSES)]
    coco = {"images": coco_images, "annotations": coco_annotations, "categories": categories}
    return _dataset(paths, objects, ids, list(range(1, len(VOC_CLASSES) + 1)), list(VOC_CLASSES), coco,
                    f"{data} (VOC {split})", every, [image["id"] for image in coco_images])


def _voc_objects(path: str):
    """(objects [(xyxy, label 1..20, difficult)], width, height) of one VOC annotation file."""
    try:
        root = ElementTree.parse(path).getroot()
        size = root.find("size")
        width, height = int(size.find("width").text), int(size.find("height").text)
        objects = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (float(box.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax"))
            difficult = obj.find("difficult")
            name = obj.find("name").text.strip()
            if name not in VOC_CLASSES:
                raise ValueError(f"unknown class {name!r}")
            # VOC's pixels are 1-based and inclusive: detectron2 subtracts 1 from the minima
            objects.append(([x0 - 1, y0 - 1, x1, y1], VOC_CLASSES.index(name) + 1,
                            difficult is not None and difficult.text.strip() == "1"))
    except (OSError, ElementTree.ParseError, AttributeError, TypeError, ValueError) as error:
        raise DataError(f"{path} is not a VOC annotation ({type(error).__name__}: {error})") from None
    return objects, width, height


def _dataset(paths, objects, ids, category_ids, names, coco, source, eval_paths, eval_ids) -> DetectionSet:
    boxes = [torch.tensor([box for box, _ in objs], dtype=torch.float32).reshape(-1, 4) for objs in objects]
    labels = [torch.tensor([label for _, label in objs], dtype=torch.int64) for objs in objects]
    return DetectionSet(list(paths), boxes, labels, list(ids), list(category_ids), list(names), coco, source,
                        list(eval_paths), list(eval_ids))


# ---- images

def read_image(path: str) -> torch.Tensor:
    """An image file -> float32 [3, H, W] in 0..1 (RGB); an unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({type(error).__name__}: {error})") from None
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    return pixels.permute(2, 0, 1).float().div_(255)


def training_batch(dataset: DetectionSet, indices: list[int], flips: torch.Tensor):
    """Images and targets of ``indices``, each flipped horizontally where ``flips`` [B] is True (detectron2's
    only training augmentation besides the resize, which the model's transform does)."""
    images, targets = [], []
    for index, flip in zip(indices, flips.tolist()):
        image, boxes = read_image(dataset.paths[index]), dataset.boxes[index].clone()
        if flip:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        images.append(image)
        targets.append({"boxes": boxes, "labels": dataset.labels[index]})
    return images, targets
