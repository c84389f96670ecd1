"""Image folder / image list -> FFCV ``.beton`` (fields ``image``: RGBImageField, ``label``: IntField).

    python -m pipelines.ffcv_writer SRC OUT.beton [--write-mode jpg|raw|proportion]
        [--max-resolution PX] [--jpeg-quality Q] [--compress-probability P] [--workers N] [--strict]

SRC is anything :func:`pipelines.sources.list_images` reads: an ImageFolder (ImageNet train / val),
a flat folder (COCO; label -1) or a ``.txt`` list (Conceptual Captions; its labels or -1).
Sample i of the ``.beton`` is the i-th readable image of the listing, in listing order.

Every image is checked with PIL first, in parallel, so that a bad file never reaches FFCV's writer
(whose worker processes hang the conversion if one of them fails): zero-byte, truncated / corrupt
and non-image files and unreadable folders are skipped and reported (``--strict``: stop with the
list instead, before writing anything); PNG, CMYK, grayscale and palette images are converted to RGB.
FFCV's writer then encodes them (``write_mode`` jpg: JPEG at ``jpeg_quality``; raw: pixels;
proportion: JPEG with probability ``compress_probability``, drawn per image from its index) after
shrinking any image whose longer side exceeds ``max_resolution``. The file is written under a
temporary name and renamed when complete; a summary ends the run (and ``OUT.skipped.txt`` lists
every skipped file with its reason).

Reading the format back (:func:`check_beton`, :func:`read_image`, :class:`BetonInfo`) lives in
:mod:`pipelines.ffcv_format`; the three names are importable from here too.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines import process_cpus
from pipelines.ffcv_format import BetonInfo, check_beton, read_image  # noqa: F401 (callers import them from here too)
from pipelines.sources import UNREADABLE, DataError, ImageList, list_images

WRITE_MODES = ("jpg", "raw", "proportion")
MAX_SIDE = 65535  # FFCV stores width and height as uint16


@dataclass
class WriteSummary:
    """What a conversion did; ``str()`` is the report printed at the end."""

    out_path: str
    written: int = 0
    skipped: list = field(default_factory=list)  # (path, reason)
    converted: dict = field(default_factory=dict)  # "PNG RGBA" -> count, converted to RGB
    largest: tuple = (0, 0)  # (width, height) of the largest stored image, after max_resolution
    bytes: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"wrote {self.written} images to {self.out_path} ({self.bytes / 2**20:.1f} MiB) in "
                 f"{self.seconds:.1f} s ({self.written / max(self.seconds, 1e-9):.0f} images/s)"]
        if self.converted:
            kinds = sorted(self.converted.items())
            lines.append("converted to RGB: " + ", ".join(f"{n} {kind}" for kind, n in kinds))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... ({len(self.skipped) - 20} more in {self.out_path}.skipped.txt)")
        width, height = self.largest
        if width * height > 2**24:  # the loader keeps (batches_ahead + 2) x batch_size such buffers
            lines.append(f"note: the largest image is {width}x{height}; the FFCV loader allocates a decode "
                         "buffer of that size per sample in flight (pass --max-resolution to shrink it)")
        return "\n".join(lines)


def write_beton(
    source: str, out_path: str, *, write_mode: str = "jpg", max_resolution: Optional[int] = None,
    jpeg_quality: int = 90, compress_probability: float = 0.5, workers: Optional[int] = None,
    strict: bool = False, progress: bool = True,
) -> WriteSummary:
    """Convert ``source`` (see the module docstring) to the ``.beton`` file ``out_path``.

    max_resolution: shrink images whose longer side exceeds this many pixels (None: keep sizes).
    workers: processes for checking and writing (None: all CPUs of this process).
    strict: raise :class:`DataError` listing every bad file / folder instead of skipping them.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    _check_args(write_mode, max_resolution, jpeg_quality, compress_probability, workers)
    if workers is None:
        workers = process_cpus()
    start = time.perf_counter()
    images, skipped = list_source(source)
    summary = WriteSummary(out_path=os.path.abspath(out_path), skipped=skipped)

    paths, labels = _check_images(images, summary, max_resolution, workers, progress)
    if strict and summary.skipped:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in summary.skipped)
        raise DataError(f"{len(summary.skipped)} unreadable file(s) or folder(s) in {source} (strict: "
                        f"nothing written):\n{listing}")
    if not paths:
        raise DataError(f"no readable images in {source} ({len(summary.skipped)} skipped)")

    # ---- write under a temporary name, rename when complete
    os.makedirs(os.path.dirname(summary.out_path), exist_ok=True)
    temporary = f"{summary.out_path}.tmp-{os.getpid()}"
    image_field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                jpeg_quality=jpeg_quality, compress_probability=compress_probability)
    # A sample must fit in one page: room for the largest image raw (JPEG of noise can exceed it a little).
    largest_bytes = 2 * 3 * summary.largest[0] * summary.largest[1] + 2**16
    page_size = max(8 * 2**20, 1 << (largest_bytes - 1).bit_length())
    try:
        writer = DatasetWriter(temporary, {"image": image_field, "label": IntField()}, page_size=page_size,
                               num_workers=workers)
        writer.from_indexed_dataset(_CheckedImages(paths, labels),
                                    chunksize=max(1, min(100, len(paths) // (4 * workers))))
        os.replace(temporary, summary.out_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    check_beton(summary.out_path)

    summary.written, summary.bytes = len(paths), os.path.getsize(summary.out_path)
    summary.seconds = time.perf_counter() - start
    _write_skipped_list(summary)
    return summary


def _check_images(images: ImageList, summary: WriteSummary, max_resolution: Optional[int], workers: int,
                  progress: bool) -> tuple[list[str], list[int]]:
    """Check every image with PIL before FFCV's writer sees it -> (paths, labels) of the readable ones;
    the others go to ``summary.skipped``, conversions and the largest stored size to ``summary``."""
    paths, labels = [], []
    checks = _map(_check_image, [(path, max_resolution) for path in images.paths], workers, progress)
    for path, label, (reason, kind, width, height) in zip(images.paths, images.labels, checks):
        if reason:
            summary.skipped.append((path, reason))
            continue
        paths.append(path)
        labels.append(label)
        if kind:
            summary.converted[kind] = summary.converted.get(kind, 0) + 1
        if width * height > summary.largest[0] * summary.largest[1]:
            summary.largest = (width, height)
    return paths, labels


def _write_skipped_list(summary: WriteSummary) -> None:
    """``OUT.skipped.txt``: every skipped file with its reason, or no such file when none was skipped."""
    skipped_file = f"{summary.out_path}.skipped.txt"
    if summary.skipped:
        with open(skipped_file, "w", encoding="utf-8") as handle:
            handle.writelines(f"{path}\t{reason}\n" for path, reason in summary.skipped)
    elif os.path.exists(skipped_file):
        os.remove(skipped_file)  # a stale list from an earlier run would mislead


class _CheckedImages:
    """What FFCV's writer reads: ``dataset[i] = (PIL RGB image, label)``. Never raises, since a failing
    FFCV writer process hangs the conversion."""

    def __init__(self, paths: list[str], labels: list[int]):
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        np.random.seed(i)  # write_mode "proportion" draws np.random.rand(): a function of the sample
        try:
            image, _ = _load_rgb(self.paths[i])
        except UNREADABLE as error:  # it passed the check, so it changed since: keep the file well-formed
            print(f"warning: {self.paths[i]} became unreadable during the conversion ({error}); "
                  "stored as a black 8x8 image", file=sys.stderr)
            image = Image.new("RGB", (8, 8))
        return image, self.labels[i]


def _load_rgb(path: str):
    """-> (RGB PIL image, "" or the "FORMAT MODE" it was converted from). Decodes fully, so truncated
    or corrupt data raise here."""
    with Image.open(path) as image:
        image.load()
        kind = "" if image.format == "JPEG" and image.mode == "RGB" else f"{image.format} {image.mode}"
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL warns when dropping palette transparency directly
        return (image if image.mode == "RGB" else image.convert("RGB")), kind


def _check_image(path: str, max_resolution: Optional[int]):
    """-> (skip reason or "", conversion kind or "", stored width, stored height)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)", "", 0, 0
        image, kind = _load_rgb(path)
    except UNREADABLE as error:
        return f"not a readable image ({type(error).__name__}: {error})", "", 0, 0
    width, height = image.size
    if max_resolution is not None and max(width, height) > max_resolution:
        # FFCV's resizer: (max_resolution / longer side * size).astype(int)
        width, height = (max_resolution / max(width, height) * np.array([width, height])).astype(int)
    if min(width, height) < 1 or max(width, height) > MAX_SIDE:
        return (f"stored size would be {width}x{height}; FFCV needs 1..{MAX_SIDE} px per side "
                "(pass --max-resolution)"), "", 0, 0
    return "", kind, int(width), int(height)


def _map(function, arguments: list[tuple], workers: int, progress: bool) -> list:
    bar = tqdm(total=len(arguments), desc="checking images", unit="img", disable=not progress)
    if workers == 1:
        results = [bar.update() or function(*a) for a in arguments]
    else:
        with multiprocessing.Pool(workers) as pool:
            results = []
            for result in pool.imap(_star, [(function, a) for a in arguments], chunksize=16):
                results.append(result)
                bar.update()
    bar.close()
    return results


def _star(item):
    function, arguments = item
    return function(*arguments)


# ---- listing

def list_source(source: str) -> tuple[ImageList, list[tuple[str, str]]]:
    """``list_images(source)``, except that a folder below the root that cannot be read, or a class
    folder without images, is returned as (path, reason) instead of raising."""
    skipped: list[tuple[str, str]] = []
    return list_images(source, skipped), skipped


def _check_args(write_mode, max_resolution, jpeg_quality, compress_probability, workers) -> None:
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")
    if max_resolution is not None and max_resolution < 1:
        raise ValueError(f"max_resolution must be >= 1 or None, got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if not 0 <= compress_probability <= 1:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 or None, got {workers}")


# ---- command line

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ffcv_writer",
                                     description="Convert an image folder or list to an FFCV .beton file.")
    parser.add_argument("source", help="ImageFolder root, flat image folder, or .txt image list")
    parser.add_argument("out", help="the .beton file to write (parent folders are created)")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="jpg",
                        help="jpg: JPEG-encode every image; raw: store pixels; proportion: JPEG with "
                        "probability --compress-probability (default jpg)")
    parser.add_argument("--max-resolution", type=int, default=None, metavar="PX",
                        help="shrink images whose longer side exceeds PX pixels (default: keep sizes)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    parser.add_argument("--compress-probability", type=float, default=0.5, metavar="P",
                        help="for --write-mode proportion (default 0.5)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--strict", action="store_true",
                        help="stop, writing nothing, if any file or folder is unreadable (default: skip)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar while checking images")
    args = parser.parse_args(argv)
    try:
        summary = write_beton(args.source, args.out, write_mode=args.write_mode,
                              max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                              compress_probability=args.compress_probability, workers=args.workers,
                              strict=args.strict, progress=not args.quiet)
    except DataError as error:
        sys.exit(f"error: {error}")
    except ValueError as error:
        parser.error(str(error))
    print(summary)


if __name__ == "__main__":
    main()
