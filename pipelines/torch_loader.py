"""The embedded default backend: PIL decode in DataLoader workers; runs anywhere (laptop CPU, CI).

Each worker decodes an image once and cuts both views from it: torchvision's RandomResizedCrop
window (``crop_window``), an antialiased bilinear resize to S x S and a horizontal flip, as uint8.
Two things make it fast on a CPU:
- JPEG draft mode: when both windows still hold at least S source pixels per side at 1/2, 1/4 or
  1/8 scale, libjpeg decodes at that scale (its IDCT skips the work). Windows are drawn in source
  pixels and snapped to the reduced grid, and the crop reported is the region actually cut.
- resizing with torch's uint8 antialiased kernel, the op torchvision's tensor ``resized_crop`` uses.

Randomness is a pure function of (seed, epoch, dataset index), so the views do not depend on the
number of workers or ranks, and a resumed epoch (``set_epoch(epoch, skip_batches)``) sees exactly the
views the uninterrupted run would have. Unreadable images are replaced by another image, chosen
deterministically, and counted (``loader.skipped``, ``loader.skipped_paths``); ``strict_data=True``
raises :class:`DataError` instead.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from pipelines import (CROP_RATIO, CROP_SCALE, Batch, check_common_args, check_position, default_workers,
                       epoch_shard, ignore_stop_signals, track)
from pipelines.sources import UNREADABLE, DataError, ImageList, fingerprint, list_images

MAX_ATTEMPTS = 32  # replacement tries before concluding the source is mostly unreadable
MAX_SKIPPED_PATHS = 20  # how many skipped files (with reasons) the loader remembers for the log
EVAL_CROP = 0.875  # eval view: resize the shorter side to S / 0.875, centre-crop S (224 <- 256)


def build_torch_loader(
    source: str, *, batch_size: int, image_size: int, device: torch.device, rank: int = 0,
    world_size: int = 1, seed: int = 0, workers: Optional[int] = None,
    crop_scale: tuple[float, float] = CROP_SCALE, crop_ratio: tuple[float, float] = CROP_RATIO,
    flip_prob: float = 0.5, strict_data: bool = False, eval_mode: bool = False, draft: bool = True,
    prefetch_factor: int = 2, pin_memory: Optional[bool] = None, timeout: float = 600.0,
) -> "TorchLoader":
    """The torch backend's loader (protocol: ``pipelines`` docstring). Per rank, ``batch_size`` images.

    workers: decode processes (None or < 0: min(8, CPUs per local rank); 0: decode in this process).
    strict_data: raise DataError on an unreadable image instead of replacing and counting it.
    eval_mode: one deterministic centre view per image (view_k is view_q), in dataset order; every
        image is seen once across ranks and the last batch may be partial (for linear evaluation).
    draft: allow JPEG draft decoding at a reduced scale (only where both views keep >= S px per side).
    pin_memory: None: pin when ``device`` is CUDA (needed for the asynchronous copy).
    timeout: seconds to wait for a worker's batch before failing (a hung read, e.g. a stalled network
        filesystem, becomes an error naming the wait instead of a silent hang); 0: wait forever.
    """
    device = torch.device(device)
    _check_args(batch_size, image_size, rank, world_size, seed, crop_scale, crop_ratio, flip_prob,
                prefetch_factor)
    images = list_images(source)
    if not eval_mode and len(images) < batch_size * world_size:
        raise DataError(f"data source {source} has {len(images)} images, fewer than one global batch "
                        f"(batch_size {batch_size} x world_size {world_size})")
    if workers is None or workers < 0:
        workers = default_workers(cap=8)
    dataset = TwoViewDataset(images, image_size, crop_scale, crop_ratio, flip_prob, seed,
                             strict_data, eval_mode, draft)
    sampler = ResumableBatchSampler(len(images), batch_size, rank, world_size, seed,
                                    shuffle=not eval_mode, drop_last=not eval_mode)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda" if pin_memory is None else pin_memory,
        persistent_workers=workers > 0, prefetch_factor=prefetch_factor if workers > 0 else None,
        worker_init_fn=ignore_stop_signals, timeout=timeout if workers > 0 else 0)
    return TorchLoader(loader, sampler, device, images)


class TorchLoader:
    """Iterable of :class:`Batch` on ``device``; ``len()`` = steps per epoch on this rank.

    skipped: failed reads so far, all epochs (an unreadable file counts each time it is drawn,
        including as a replacement for another).
    skipped_paths: the first ``MAX_SKIPPED_PATHS`` distinct unreadable files, as (path, reason).
    """

    def __init__(self, loader: DataLoader, sampler: "ResumableBatchSampler", device: torch.device,
                 images: ImageList):
        self.loader, self.sampler, self.device, self.images = loader, sampler, device, images
        self.skipped = 0
        self.skipped_paths: list[tuple[str, str]] = []
        self._warned: set[str] = set()
        track(self)  # closed at exit if nobody did: its workers would keep the interpreter from exiting

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch, skip_batches)

    def fingerprint(self) -> dict:
        """The data this loader reads: image count and a hash of the listing (see sources.fingerprint)."""
        return fingerprint(self.images.paths, len(self.images))

    def __iter__(self):
        try:
            for item in self.loader:
                self._count_failures(item["failures"])
                one_view = item["view_k"] is None  # eval_mode
                batch = Batch(view_q=item["view_q"], view_k=item["view_q" if one_view else "view_k"],
                              crop_q=item["crop_q"], crop_k=item["crop_k"], index=item["index"],
                              label=item["label"])
                # non_blocking: the copy from pinned memory overlaps with the step already queued.
                batch = batch.to(self.device, non_blocking=True)
                if one_view:
                    batch.view_k = batch.view_q  # one tensor on the device, not two copies
                yield batch
        except Exception:
            # A worker's error (strict_data) leaves its iterator in a reference cycle with the
            # traceback; shut the workers down now, or the garbage collector later blocks ~5 s per
            # worker on their join timeout.
            self.close()
            raise

    def close(self) -> None:
        """Stop the worker processes now (persistent workers otherwise live as long as the loader);
        iterating again starts new ones. Uses DataLoader's private iterator: there is no public way."""
        iterator, self.loader._iterator = self.loader._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # asks each worker to finish, joins each for up to 5 s
            _kill_left_over(iterator)

    def _count_failures(self, failures: list[tuple[str, str]]) -> None:
        self.skipped += len(failures)
        for path, reason in failures:
            if path in self._warned:
                continue
            self._warned.add(path)
            if len(self.skipped_paths) < MAX_SKIPPED_PATHS:
                self.skipped_paths.append((path, reason))
            warnings.warn(f"skipping unreadable image {path} ({reason}); replaced by another image "
                          "(strict_data=True stops instead)", stacklevel=2)


def _kill_left_over(iterator) -> None:
    """SIGKILL the workers still alive after DataLoader's shutdown: one stuck in a read, or all of them
    when the shutdown was a no-op (it does nothing once torch's exit flag is set). They ignore SIGTERM
    (``ignore_stop_signals``), which is what DataLoader's and multiprocessing's own fallbacks send."""
    workers = [w for w in getattr(iterator, "_workers", []) if w.is_alive()]
    if not workers:
        return
    if getattr(iterator, "_worker_pids_set", False):  # a death we cause is not a worker failure
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


class ResumableBatchSampler:
    """DistributedSampler semantics in batches, resumable mid-epoch. Yields lists of (epoch, index).

    Each epoch is a permutation drawn from (seed, epoch); global step b takes its images
    ``b * G .. (b + 1) * G`` (G = batch_size x world_size, the last partial global batch dropped) and
    rank r takes every world_size-th of them, so ranks are disjoint and take equal steps.
    Without shuffle and drop_last (evaluation) every image is taken once, in order.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Iterate ``epoch`` next, starting at step ``skip_batches`` (until the next set_epoch)."""
        check_position(epoch, skip_batches, len(self))
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // (self.batch_size * self.world_size)
        return math.ceil(len(range(self.rank, self.size, self.world_size)) / self.batch_size)

    def __iter__(self):
        mine = epoch_shard(self.size, self.batch_size, self.rank, self.world_size, self.seed, self.epoch,
                           self.shuffle, self.drop_last)
        for step in range(self.skip_batches, len(self)):
            chunk = mine[step * self.batch_size : (step + 1) * self.batch_size]
            yield [(self.epoch, int(index)) for index in chunk]


class TwoViewDataset(Dataset):
    """``dataset[(epoch, index)]`` -> dict of one sample's views, crops, index, label and failures."""

    def __init__(self, images: ImageList, image_size: int, crop_scale, crop_ratio, flip_prob: float,
                 seed: int, strict: bool, eval_mode: bool, draft: bool):
        self.images, self.image_size, self.seed = images, image_size, seed
        self.crop_scale, self.crop_ratio, self.flip_prob = crop_scale, crop_ratio, flip_prob
        self.strict, self.eval_mode, self.draft = strict, eval_mode, draft

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        failures = []
        for attempt in range(MAX_ATTEMPTS):
            # A fresh generator per attempt keeps every draw a pure function of its key.
            rng = np.random.default_rng([self.seed, epoch, index, attempt])
            chosen = index if attempt == 0 else int(rng.integers(len(self.images)))
            path = self.images.paths[chosen]
            try:
                pixels, scale, size, windows = self._decode(path, rng)
            except UNREADABLE as error:
                if self.strict:
                    raise DataError(f"cannot read image {path}: {error} (strict_data=True)") from error
                failures.append((path, f"{type(error).__name__}: {error}"))
                continue
            (view_q, crop_q), *rest = [_cut(pixels, w, scale, size, self.image_size) for w in windows]
            view_k, crop_k = rest[0] if rest else (None, crop_q)
            return {"view_q": view_q, "view_k": view_k, "crop_q": crop_q, "crop_k": crop_k,
                    "index": chosen, "label": self.images.labels[chosen], "failures": failures}
        raise DataError(f"no readable image after {MAX_ATTEMPTS} tries starting at "
                        f"{self.images.paths[index]}; is the data source mostly unreadable? "
                        f"first failures: {failures[:3]}")

    def _decode(self, path: str, rng: np.random.Generator):
        """Open ``path``, draw the view windows from its size (header only), decode (at a reduced
        scale if both windows allow it), convert to RGB.

        Returns pixels uint8 [3, H', W'], the reduction ``scale`` (H' = ceil(H / scale)), the source
        size (W, H) and the windows (source pixels)."""
        with open(path, "rb") as handle:
            image = Image.open(handle)
            size = image.size
            if self.eval_mode:
                windows = [eval_window(*size, self.image_size)]
            else:
                windows = [self._random_window(*size, rng) for _ in range(2)]
            scale = 1
            reduction = draft_reduction(windows, self.image_size) if self.draft else 1
            if reduction > 1:  # a no-op (None) for formats other than JPEG
                drafted = image.draft("RGB", (size[0] // reduction, size[1] // reduction))
                if drafted is not None:  # its box is (0, 0, W / scale, H / scale)
                    scale = round(size[0] / drafted[1][2])
            image.load()
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL warns when dropping palette transparency directly
        if image.mode != "RGB":
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), scale, size, windows  # [3, H', W']

    def _random_window(self, width: int, height: int, rng: np.random.Generator) -> "Window":
        left, top, w, h = crop_window(width, height, self.crop_scale, self.crop_ratio, rng)
        return Window(left, top, w, h, bool(rng.random() < self.flip_prob))


class Window(NamedTuple):
    """A view's window in source pixels, and whether the view is mirrored."""

    left: int
    top: int
    width: int
    height: int
    flipped: bool


def crop_window(width: int, height: int, scale, ratio, rng) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a central crop) with draws from
    ``rng`` (``uniform(a, b)``, ``integers(low, high)``) -> (left, top, crop width, crop height)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_window(width: int, height: int, image_size: int) -> Window:
    """Resize the shorter side to S / 0.875 and centre-crop S, as one square source window (so the
    view is resampled once)."""
    side = max(1, round(min(width, height) * image_size / int(image_size / EVAL_CROP)))
    return Window((width - side) // 2, (height - side) // 2, side, side, False)


def draft_reduction(windows: list[Window], image_size: int) -> int:
    """Largest JPEG scale reduction (8, 4, 2) at which every window keeps >= S pixels per side."""
    smallest = min(min(window.width, window.height) for window in windows)
    return next((r for r in (8, 4, 2) if smallest / r >= image_size), 1)


def _cut(pixels: torch.Tensor, window: Window, scale: int, size: tuple[int, int], image_size: int):
    """Cut one view from pixels uint8 [3, H', W'] decoded at 1 / ``scale``.

    The window is snapped to the decoded pixel grid (a no-op at full scale); decoded pixel k covers
    source pixels [k * scale, (k + 1) * scale), so the reported crop is the region actually cut.
    Returns the view uint8 [3, S, S] and its crop row float32 [5] (source fractions, flipped).
    """
    width, height = size
    rows, cols = pixels.shape[1:]
    left = min(cols - 1, round(window.left / scale))
    top = min(rows - 1, round(window.top / scale))
    right = min(cols, max(left + 1, round((window.left + window.width) / scale)))
    bottom = min(rows, max(top + 1, round((window.top + window.height) / scale)))
    patch = pixels[None, :, top:bottom, left:right]  # [1, 3, h, w]
    # torch's uint8 antialiased bilinear kernel: 2-3x faster than PIL's resize, and the same
    # operation as torchvision's resized_crop on tensors.
    view = torch.nn.functional.interpolate(patch, size=(image_size, image_size), mode="bilinear",
                                           antialias=True, align_corners=False)[0]  # [3, S, S]
    if window.flipped:
        view = view.flip(-1)
    crop = [left * scale / width, top * scale / height, min(right * scale, width) / width,
            min(bottom * scale, height) / height, float(window.flipped)]
    return view, torch.tensor(crop, dtype=torch.float32)  # [3, S, S], [5]


def collate(samples: list[dict]) -> dict:
    """Stack samples; in a worker, default_collate writes straight into shared memory (no extra copy)."""
    out = {key: default_collate([s[key] for s in samples])
           for key in ("view_q", "crop_q", "crop_k", "index", "label")}
    out["view_k"] = None if samples[0]["view_k"] is None else default_collate([s["view_k"] for s in samples])
    out["failures"] = [failure for s in samples for failure in s["failures"]]
    return out


def _check_args(batch_size, image_size, rank, world_size, seed, crop_scale, crop_ratio, flip_prob,
                prefetch_factor) -> None:
    check_common_args(batch_size, image_size, rank, world_size, seed, crop_scale, crop_ratio, flip_prob)
    if prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
