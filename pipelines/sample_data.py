"""A small, deterministic ImageFolder of realistic JPEGs, cut from the photographs in scikit-image.

Used by the CPU demo, the tests and the benchmarks wherever ImageNet is not at hand. Each class is
one source photograph that ships inside the scikit-image package (no download); each image is a
random window of it (position, area, aspect, mirror), resized to an ImageNet-like size (by default
about 500 x 375, a fifth of them portrait, some larger or smaller) with a colour shift, and written
as a JPEG of quality 90.

The output is a pure function of the arguments: the same arguments give byte-identical files (every
random draw comes from ``numpy.random.default_rng([seed, i])``, colour shifts are integer lookup
tables, and resizing / JPEG coding are deterministic). A manifest written last marks a complete
dataset, so a second call with the same arguments reuses it.

    python -m pipelines.sample_data data/sample --images 240 --classes 8 --seed 0
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import socket

import numpy as np
from PIL import Image

# (class name, file inside skimage/data): the colour photographs that ship with scikit-image.
SOURCES = (
    ("astronaut", "astronaut.png"),
    ("coffee", "coffee.png"),
    ("chelsea", "chelsea.png"),
    ("rocket", "rocket.jpg"),
    ("motorcycle", "motorcycle_left.png"),
    ("hubble", "hubble_deep_field.jpg"),
    ("histology", "ihc.png"),
    ("retina", "retina.jpg"),
)
MANIFEST = "sample_data.json"
JPEG_QUALITY = 90
FORMAT_VERSION = 1  # bump when the generator changes what it writes, so old datasets are rebuilt


def make_sample_data(
    out_dir: str,
    num_images: int = 240,
    num_classes: int = len(SOURCES),
    seed: int = 0,
    size: tuple[int, int] = (500, 375),
) -> str:
    """Write (or reuse) ``num_images`` JPEGs in ``num_classes`` class folders under ``out_dir``.

    size: (width, height) of a typical landscape image; portraits swap it, some images are scaled.
    Image i belongs to class ``i % num_classes``. Returns ``out_dir``.
    """
    params = _check_params(num_images, num_classes, seed, size)
    out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
    previous = _read_manifest(out_dir)
    if previous is not None and previous["params"] == params and _complete(out_dir, previous):
        return out_dir
    if os.path.isfile(out_dir):
        raise ValueError(f"out_dir {out_dir} is a file; expected a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and previous is None:
        raise ValueError(f"out_dir {out_dir} is not empty and holds no {MANIFEST}; "
                         "pick a new or empty folder for the sample data")
    if previous is not None:
        _check_only_ours(out_dir, previous)  # before writing anything

    # Write into a sibling temp folder and rename it into place, so an interrupted run never leaves
    # a folder that looks complete, and concurrent callers cannot see half-written images.
    staging = f"{out_dir}.tmp-{socket.gethostname()}-{os.getpid()}"
    _write_dataset(staging, params, num_images, num_classes, seed, size)
    return _publish(staging, out_dir, params)


def _write_dataset(staging: str, params: dict, num_images: int, num_classes: int, seed: int,
                   size: tuple[int, int]) -> None:
    """Render every image into the fresh folder ``staging``, then the manifest (written last)."""
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    photos = [_load_photo(file) for _, file in SOURCES[:num_classes]]
    files = []
    for i in range(num_images):
        label = i % num_classes
        name = SOURCES[label][0]
        relative = f"{name}/{name}_{i:05d}.jpg"
        os.makedirs(os.path.join(staging, name), exist_ok=True)
        image = _render(photos[label], np.random.default_rng([seed, i]), size)
        image.save(os.path.join(staging, relative), "JPEG", quality=JPEG_QUALITY)
        files.append({"path": relative, "bytes": os.path.getsize(os.path.join(staging, relative))})
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump({"params": params, "files": files}, handle, indent=1)


def _publish(staging: str, out_dir: str, params: dict) -> str:
    """Rename the complete ``staging`` folder to ``out_dir``, unless another process got there first
    with the same dataset -> ``out_dir``."""
    current = _read_manifest(out_dir)  # another process (a second rank) may have finished first
    if current is not None and current["params"] == params and _complete(out_dir, current):
        shutil.rmtree(staging, ignore_errors=True)
        return out_dir
    try:
        if current is not None:
            _check_only_ours(out_dir, current)
            shutil.rmtree(out_dir)
        elif os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (make_sample_data checked)
        os.replace(staging, out_dir)
    except OSError:  # lost a race with another process writing the same dataset
        winner = _read_manifest(out_dir)
        if winner is None or winner["params"] != params or not _complete(out_dir, winner):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful replace
    return out_dir


def _check_params(num_images, num_classes, seed, size) -> dict:
    if not 1 <= num_classes <= len(SOURCES):
        raise ValueError(f"num_classes must be in 1..{len(SOURCES)} (one class per source photo), "
                         f"got {num_classes}")
    if num_images < num_classes:
        raise ValueError(f"num_images must be >= num_classes ({num_classes}), got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    width, height = (int(s) for s in size)
    if width < 16 or height < 16:
        raise ValueError(f"size must be (width, height) with both >= 16, got {size}")
    return {"version": FORMAT_VERSION, "num_images": int(num_images), "num_classes": int(num_classes),
            "seed": int(seed), "size": [width, height], "quality": JPEG_QUALITY}


def _load_photo(file: str) -> Image.Image:
    # Read the file straight from the installed package: no download and no `import skimage`
    # (which is slow); find_spec locates the package without executing it.
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the sample data is cut from scikit-image's photographs: "
                          "pip install scikit-image")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", file)
    with Image.open(path) as photo:
        return photo.convert("RGB")


def _render(photo: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One image: a random window of ``photo``, resized to an ImageNet-like size, colour-shifted."""
    width, height = size
    if rng.random() < 0.2:  # portrait, as about a fifth of ImageNet is
        width, height = height, width
    scale = rng.uniform(0.7, 1.3) if rng.random() < 0.4 else 1.0  # varied sizes
    width, height = max(16, round(width * scale)), max(16, round(height * scale))

    # The largest window of the output's aspect that fits the photo, shrunk to 35-100 % of its area.
    photo_w, photo_h = photo.size
    aspect = width / height
    max_w = min(photo_w, photo_h * aspect)
    side = math.sqrt(rng.uniform(0.35, 1.0))
    crop_w, crop_h = max_w * side, max_w * side / aspect
    x0 = rng.uniform(0, photo_w - crop_w)
    y0 = rng.uniform(0, photo_h - crop_h)
    image = photo.resize((width, height), Image.Resampling.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    # Colour shift as lookup tables applied to integers (no float image maths whose rounding could
    # vary between machines): a gamma and per-channel gains.
    gamma = math.exp(rng.uniform(-0.25, 0.25))
    gains = rng.uniform(0.85, 1.15, size=3)
    tables = [min(255, round(255 * (v / 255) ** gamma * float(g))) for g in gains for v in range(256)]
    return image.point(tables)


def _read_manifest(out_dir: str):
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "params" in manifest else None


def _complete(out_dir: str, manifest: dict) -> bool:
    for entry in manifest.get("files", []):
        path = os.path.join(out_dir, entry["path"])
        if not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"]:
            return False
    return bool(manifest.get("files"))


def _check_only_ours(out_dir: str, manifest: dict) -> None:
    """Refuse to replace a dataset folder that holds files this module did not write."""
    ours = {os.path.normpath(entry["path"]) for entry in manifest.get("files", [])} | {MANIFEST}
    found = {os.path.relpath(os.path.join(folder, name), out_dir)
             for folder, _, names in os.walk(out_dir) for name in names}
    if found - ours:
        raise ValueError(f"out_dir {out_dir} holds files the sample generator did not write "
                         f"({', '.join(sorted(found - ours)[:5])}); not replacing it")


def resolve_source(data: str, sample_dir: str, sample_images: int, local_rank: int = 0) -> str:
    """A run's data path: ``data``, or for ``"sample"`` the sample set, built once per node (by local rank 0,
    the other ranks wait at a barrier under a process group) and reused."""
    if data != "sample":
        return data
    if local_rank == 0:
        make_sample_data(sample_dir, num_images=sample_images, seed=0)
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return sample_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.sample_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write the ImageFolder into (reused if complete)")
    parser.add_argument("--images", type=int, default=240, help="number of images (default 240)")
    parser.add_argument("--classes", type=int, default=len(SOURCES),
                        help=f"number of classes, 1..{len(SOURCES)} (default {len(SOURCES)})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("WIDTH", "HEIGHT"),
                        help="typical landscape image size (default 500 375)")
    args = parser.parse_args(argv)
    try:
        path = make_sample_data(args.out_dir, args.images, args.classes, args.seed, tuple(args.size))
    except ValueError as error:
        parser.error(str(error))
    print(path)


if __name__ == "__main__":
    main()
