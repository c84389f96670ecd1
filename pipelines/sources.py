"""Where images come from: one listing shared by every backend and by the FFCV writer.

A source is one of
- an ImageFolder root: ``root/<class>/<image>`` (labels are the sorted class names' indices);
- a flat folder of images, searched recursively (COCO-style, unlabeled: label -1);
- a ``.txt`` file with one image path per line, optionally followed by whitespace and an integer
  label (web-scale lists); relative paths are taken relative to the list's folder; ``#`` comments.

Every problem with the source itself is a :class:`DataError` that names the path. A caller that
would rather go on (the FFCV writer) passes a ``skipped`` list: then an unreadable folder below the
root, or a class folder without images, is appended to it as ``(path, reason)`` instead (a class
folder keeps its label either way).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from PIL import Image

# What PIL raises for a file that is not a readable image (corrupt, truncated, not an image, too big).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """The data source is missing, empty or malformed; the message names the path."""


@dataclass(frozen=True)
class ImageList:
    paths: list[str]
    labels: list[int]  # -1 where the source has no labels
    classes: list[str]  # empty for unlabeled sources

    def __len__(self) -> int:
        return len(self.paths)


def fingerprint(names, count: int) -> dict:
    """What a checkpoint records of its data: the sample count and a SHA-256 of the listing.

    ``names``: one string per sample (or per shard); only the last two path components enter the hash
    (``class/file.jpg``), so the same dataset moved to another mount keeps its fingerprint.
    """
    digest = hashlib.sha256()
    for name in names:
        digest.update("/".join(str(name).replace(os.sep, "/").split("/")[-2:]).encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return {"images": int(count), "listing_sha256": digest.hexdigest()[:16]}


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _listdir(path: str, skipped: list | None = None) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as error:
        if skipped is None:
            reason = "permission denied" if isinstance(error, PermissionError) else error.strerror or error
            raise DataError(f"cannot read directory {path}: {reason}") from error
        skipped.append((path, f"cannot read folder ({error.strerror or error})"))
        return []


def _walk_images(root: str, skipped: list | None) -> list[str]:
    found = []
    for name in _listdir(root, skipped):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            found.extend(_walk_images(path, skipped))
        elif is_image_file(name):
            found.append(path)
    return found


def _from_folder(root: str, skipped: list | None) -> ImageList:
    entries = _listdir(root)  # the root itself must be readable either way
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    loose_images = [e for e in entries if is_image_file(e)]
    if class_dirs and not loose_images:  # ImageFolder
        paths, labels, empty = [], [], []
        for label, name in enumerate(class_dirs):
            images = _walk_images(os.path.join(root, name), skipped)
            if not images:
                empty.append(os.path.join(root, name))
            paths.extend(images)
            labels.extend([label] * len(images))
        if empty and skipped is not None:
            skipped.extend((path, "class folder holds no images") for path in empty)
        elif empty:
            raise DataError(
                f"{len(empty)} class folder(s) under {root} hold no images "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty[:5])}"
                + (" ..." if len(empty) > 5 else "")
            )
        images = ImageList(paths, labels, class_dirs)
    else:
        paths = _walk_images(root, skipped)
        images = ImageList(paths, [-1] * len(paths), [])
    if not images.paths:
        raise DataError(f"no images found under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})"
                        + (f"; {len(skipped)} unreadable or empty folders" if skipped else ""))
    return images


def _from_list(list_file: str) -> ImageList:
    base = os.path.dirname(os.path.abspath(list_file))
    paths, labels = [], []
    with open(list_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            label = -1
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                line, label = parts[0], int(parts[1])
            paths.append(line if os.path.isabs(line) else os.path.join(base, line))
            labels.append(label)
    if not paths:
        raise DataError(f"image list {list_file} names no images")
    labelled = sorted({label for label in labels if label >= 0})
    classes = [str(label) for label in range(labelled[-1] + 1)] if labelled else []
    return ImageList(paths, labels, classes)


def list_images(source: str, skipped: list | None = None) -> ImageList:
    """List the images (and labels) of ``source``; raise :class:`DataError` if there are none.

    skipped: if a list, unreadable folders below the root and class folders without images are
    appended to it as ``(path, reason)`` instead of raising (see the module docstring).
    """
    source = os.path.expanduser(str(source))
    if not os.path.exists(source):
        raise DataError(f"data source {source} does not exist")
    if os.path.isdir(source):
        return _from_folder(source, skipped)
    if source.endswith(".txt"):
        return _from_list(source)
    raise DataError(
        f"cannot read data source {source}: expected an image folder or a .txt list of image paths"
    )
