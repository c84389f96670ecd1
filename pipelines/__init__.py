"""Data backends. Each turns a dataset into :class:`Batch` and nothing more (docs/DESIGN.md 2.1).

Every backend cuts two views from one decoded image (random resized crop + horizontal flip + resize
to ``image_size``), returns them as uint8, and reports where it cut: ``crop = [x0, y0, x1, y1,
flipped]`` in [0, 1] coordinates of the source image. Box pairing (``maskco.boxes``) and photometric
augmentation (``maskco.augment``) happen on the training device, identically for every backend.

A loader returned by :func:`build_loader` is an iterable of ``Batch`` with ``len()`` = steps per
epoch on this rank (the last partial batch is dropped, so every rank takes the same number of
steps) and ``set_epoch(epoch, skip_batches=0)``: ``skip_batches`` resumes an interrupted epoch at
that step, seeing the same samples the uninterrupted run would have seen next.
"""
from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys
import weakref
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Iterator, Optional, Protocol, runtime_checkable

import numpy

from maskco import vocab
from pipelines.sources import DataError  # noqa: F401  (re-exported: the one error type for bad data)

if TYPE_CHECKING:  # no torch at import: a data tool's --help (python -m pipelines.fmnist ...) answers at once
    import torch


@dataclass
class Batch:
    """One step of input, on the training device.

    view_q, view_k: uint8 [N, 3, S, S]  the two views, geometry only (no colour change, no normalisation)
    crop_q, crop_k: float32 [N, 5]      x0, y0, x1, y1 in [0, 1] source coordinates, and flipped (0/1)
    index:          int64 [N] or None   dataset index of each sample
    label:          int64 [N] or None   class label (-1 where the source has none)
    """

    view_q: torch.Tensor
    view_k: torch.Tensor
    crop_q: torch.Tensor
    crop_k: torch.Tensor
    index: Optional[torch.Tensor] = None
    label: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """Move every tensor field to ``device`` (no copy where it is already there)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = None if value is None else value.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    def __len__(self) -> int:
        return self.view_q.shape[0]


# MoCo v2's random resized crop [paper], used by every backend; the Config's defaults are these.
CROP_SCALE, CROP_RATIO = vocab.CROP_SCALE, vocab.CROP_RATIO  # area fraction of the source image, aspect ratio


def process_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM or container limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(cap: Optional[int] = None) -> int:
    """A backend's decode workers when none are asked for: this process's CPUs shared by the ranks of
    the node (LOCAL_WORLD_SIZE), at least 1, at most ``cap``."""
    workers = max(1, process_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(workers, cap) if cap else workers


@runtime_checkable
class Loader(Protocol):
    """What every backend's :func:`build_loader` returns (the trainer, bench and evaluation rely on nothing else).

    ``iter(loader)`` yields this rank's :class:`Batch` es of one epoch, on the training device.
    """

    skipped: int  # unreadable images replaced by another one so far (every occurrence), this process

    def __len__(self) -> int:
        """Steps per epoch on this rank: the same on every rank (the last partial global batch is dropped)."""

    def __iter__(self) -> Iterator[Batch]:
        """The steps of the epoch set by :meth:`set_epoch` (else the next one), from its ``skip_batches``."""

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Iterate ``epoch`` next, starting at step ``skip_batches``: the samples the uninterrupted run sees there."""

    def fingerprint(self) -> dict:
        """What is read: ``{"images": count, "listing_sha256": ...}`` (stored in checkpoints, compared on resume)."""

    def close(self) -> None:
        """Release workers or threads now (a later pass starts them again)."""


# name -> "module:function"; imported lazily so that a missing optional backend (DALI, FFCV) only
# fails when it is asked for, with a message that says how to install it.
BACKENDS = {
    "torch": "pipelines.torch_loader:build_torch_loader",
    "ffcv": "pipelines.ffcv_loader:build_ffcv_loader",
    "dali": "pipelines.dali_loader:build_dali_loader",
    "dali-cpu": "pipelines.dali_loader:build_dali_cpu_loader",
}

assert tuple(BACKENDS) == vocab.BACKENDS, "pipelines.BACKENDS and maskco.vocab.BACKENDS must list the same names"

INSTALL_HINTS = {
    "ffcv": "install it with `pip install -e .[ffcv]` after `apt-get install -y pkg-config "
    "libopencv-dev libturbojpeg0-dev`",
    "dali": "install it with `pip install -e .[dali]` (nvidia-dali-cuda130)",
    "dali-cpu": "install it with `pip install -e .[dali]` (nvidia-dali-cuda130)",
}


def build_loader(
    backend: str,
    source: str,
    *,
    batch_size: int,
    image_size: int,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    workers: Optional[int] = None,
    crop_scale: tuple[float, float] = CROP_SCALE,
    crop_ratio: tuple[float, float] = CROP_RATIO,
    flip_prob: float = 0.5,
    **backend_options,
) -> Loader:
    """Build the loader of ``backend`` over ``source``; see the module docstring for its protocol.

    source: an ImageFolder root, a flat folder of images, a ``.txt`` list of image paths, or what the
    backend reads natively (``.beton`` for FFCV, webdataset ``.tar`` shards for DALI).
    batch_size: images per step on this rank.  workers: decode processes/threads (None: backend default).
    crop_scale, crop_ratio, flip_prob: the random-resized-crop and flip of both views (MoCo v2 defaults).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    module_name, function_name = BACKENDS[backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        hint = INSTALL_HINTS.get(backend, "")
        raise ImportError(f"data backend {backend!r} is not available ({error}); {hint}") from error
    build = getattr(module, function_name)
    import torch  # loaded with the backend already; here for the device argument only

    return track(build(
        source,
        batch_size=batch_size,
        image_size=image_size,
        device=torch.device(device),
        rank=rank,
        world_size=world_size,
        seed=seed,
        workers=workers,
        crop_scale=tuple(crop_scale),
        crop_ratio=tuple(crop_ratio),
        flip_prob=flip_prob,
        **backend_options,
    ))


# Every loader not yet garbage-collected, closed when the interpreter exits (close_all).
_LIVE: "weakref.WeakSet[Loader]" = weakref.WeakSet()
_REGISTERED = False  # close_all is registered with atexit (at the first loader: see track)


def track(loader: Loader) -> Loader:
    """Close ``loader`` at interpreter exit if nobody did (returns it). build_loader tracks every loader.

    :func:`close_all` is registered at the first loader, when the backend has imported ``multiprocessing``
    and ``torch.utils.data``: atexit runs last-registered first, so it runs before their exit handlers.
    """
    global _REGISTERED
    if not _REGISTERED:
        atexit.register(close_all)
        _REGISTERED = True
    _LIVE.add(loader)
    return loader


def close_all() -> None:
    """Close every live loader: run at interpreter exit, after an unhandled exception or sys.exit too.

    Loader workers ignore SIGTERM (:func:`ignore_stop_signals`), so multiprocessing's own exit handler,
    which sends SIGTERM to its daemon children and then joins them without a timeout, would wait forever
    for a worker that nobody closed (a script that forgot ``close()``, a crash mid-epoch). Registered
    after ``multiprocessing.util`` and ``torch.utils.data`` (:func:`track`), so it runs before both of
    their exit handlers (atexit runs last-registered first), while the workers can still be shut down.
    """
    for loader in list(_LIVE):
        try:
            loader.close()
        except Exception as error:  # one loader's failure must not keep the others' workers alive
            print(f"pipelines: closing {type(loader).__name__} at exit failed: {error}", file=sys.stderr)



def epoch_shard(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                shuffle: bool = True, drop_last: bool = True) -> numpy.ndarray:
    """This rank's dataset indices of ``epoch``, in step order (int64).

    The one sample assignment every backend uses, so that they see the same images at the same step:
    a permutation drawn from (seed, epoch), cut to whole global batches (``drop_last``), then every
    ``world_size``-th index from ``rank``, so ranks are disjoint. Step b of this rank is
    ``indices[b * batch_size:(b + 1) * batch_size]``.
    """
    order = numpy.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle else numpy.arange(num_samples)
    if drop_last:  # whole global batches only
        order = order[: num_samples // (batch_size * world_size) * batch_size * world_size]
    return order[rank::world_size]


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a loader's worker process: ignore SIGINT and SIGTERM (``DataLoader(worker_init_fn=...)``).

    torchrun, SLURM and ``timeout`` signal the whole process group (SLURM every process of the job
    step); a worker that died of it would take the trainer down (PyTorch's SIGCHLD handler raises)
    before it could write its checkpoint. The main process decides when to stop and ends its workers
    itself: ``close()``, which kills a worker that does not finish in time, and :func:`close_all` at
    exit. A worker whose parent is gone (killed) exits on its own within 5 s (DataLoader's watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check_common_args(batch_size, image_size, rank, world_size, seed, crop_scale, crop_ratio, flip_prob) -> None:
    """Validate the arguments every backend takes from :func:`build_loader`; ValueError names the argument."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1 with world_size >= 1, got rank {rank}, "
                         f"world_size {world_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1]:
        raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high, got {crop_scale}")
    if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
        raise ValueError(f"crop_ratio must be (low, high) with 0 < low <= high, got {crop_ratio}")
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")


def check_position(epoch: int, skip_batches: int, steps_per_epoch: int) -> None:
    """Validate the arguments of a loader's ``set_epoch(epoch, skip_batches)``."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if not 0 <= skip_batches <= steps_per_epoch:
        raise ValueError(f"skip_batches must be in 0..{steps_per_epoch} (steps per epoch), got {skip_batches}")


def available_backends() -> dict[str, str]:
    """Map every backend name to "" if it imports, else to the reason it does not."""
    status = {}
    for name, target in BACKENDS.items():
        try:
            importlib.import_module(target.split(":")[0])
            status[name] = ""
        except ImportError as error:
            status[name] = f"{error}; {INSTALL_HINTS.get(name, '')}".strip("; ")
    return status
