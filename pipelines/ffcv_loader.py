"""The FFCV backend: a ``.beton`` file -> :class:`pipelines.Batch`, decoding each JPEG once.

FFCV's loading thread runs :class:`pipelines.ffcv_ops.TwoViewDecoder`, which decodes each sample
once and cuts, resizes and mirrors both views inside FFCV's compiled pipeline (that module holds the
decoder and its numba kernels). This module orders and shards the samples, hands the order to FFCV
and assembles each :class:`Batch`. The views' windows are a pure function of (seed, epoch, dataset
index, view), so ``Batch.crop_q / crop_k`` are recomputed exactly from the batch's indices
(:func:`pipelines.ffcv_ops.crop_rows`), and a new epoch reaches the compiled decoder through a
one-element array (no recompilation).

Order and sharding: what FFCV's ``distributed=True`` does (each rank a disjoint share of one seeded
permutation), with an explicit rank / world size, so no process group is needed, and with the torch
backend's assignment: order ``"random"`` permutes the dataset with ``default_rng([seed, epoch])``,
keeps whole global batches (``batch_size x world_size``; the remainder is dropped, a different one
each epoch) and gives rank r every world_size-th sample. ``"quasi_random"`` is FFCV's page-local
order (for datasets larger than RAM, with ``os_cache=False``), one process only. Every rank takes
``len(loader)`` equal steps; there is no partial last batch. ``set_epoch(epoch, skip_batches)``
resumes exactly: the order is a pure function of (seed, epoch), and the skipped batches are left
out of the order handed to FFCV's loading thread (nothing is decoded and thrown away).

Buffers: a batch's views live in FFCV's ring buffers. On the CPU they are overwritten once the
following batch is requested (clone what you keep); with a CUDA ``device`` they are copied with
``non_blocking=True`` and FFCV's events keep a slot until the stream has used it. ``view_q`` and
``view_k`` are channels-last strided views ``[N, 3, S, S]`` of one ``[N, 2, S, S, 3]`` buffer.

Compilation: FFCV compiles the decoder with numba at the first batch, once per loader (a few
seconds); the kernels of :mod:`pipelines.ffcv_ops` are cached on disk, in ``cache_dir`` or numba's
default place. FFCV sets torch's intra-op thread count to ``workers``.
"""
from __future__ import annotations

import queue
from typing import Optional
from unittest import mock

import ffcv.loader.loader
import numba
import numpy as np
import torch
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.memory_managers import OSCacheManager
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.transforms import ToDevice, ToTensor

from pipelines import CROP_RATIO, CROP_SCALE, Batch, check_common_args, check_position, default_workers, epoch_shard
from pipelines.ffcv_ops import (HAS_LINEAR, INTERPOLATIONS, TwoViewDecoder, _cache_kernels_in, crop_rows,
                                window_params)
from pipelines.ffcv_format import BetonInfo, check_beton
from pipelines.sources import DataError, fingerprint

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM}


def build_ffcv_loader(
    source: str, *, batch_size: int, image_size: int, device: torch.device, rank: int = 0,
    world_size: int = 1, seed: int = 0, workers: Optional[int] = None,
    crop_scale: tuple[float, float] = CROP_SCALE, crop_ratio: tuple[float, float] = CROP_RATIO,
    flip_prob: float = 0.5, order: str = "random", os_cache: bool = True, batches_ahead: int = 3,
    interpolation: str = "auto", cache_dir: Optional[str] = None, **_other_backend_options,
) -> "FFCVLoader":
    """The FFCV backend's loader over the ``.beton`` file ``source`` (protocol: ``pipelines`` docstring).

    workers: decode threads (None or < 1: the CPUs of this process / LOCAL_WORLD_SIZE).
    order: "random" or "quasi_random" (one process only; see the module docstring).
    os_cache: read through the OS page cache (memory map; shared by the ranks of a node); False: FFCV's
        own page cache, which only reads what the epoch needs (for datasets larger than RAM).
    batches_ahead: batches prepared ahead of the consumer (memory: batches_ahead + 2 batch buffers).
    interpolation: "area" (FFCV's cv2 INTER_AREA: antialiased, but it costs about twice the JPEG
        decode per view), "linear" (INTER_LINEAR: several times cheaper; aliases when shrinking by
        2x or more), "auto" (INTER_AREA from a 2x shrink on, else INTER_LINEAR).
    cache_dir: where numba caches the kernels of pipelines.ffcv_ops (process-wide; None: numba's default).
    Options of other backends are ignored.
    """
    device = torch.device(device)
    _check_args(batch_size, image_size, rank, world_size, seed, crop_scale, crop_ratio, flip_prob,
                order, batches_ahead, interpolation)
    info = check_beton(source)
    if info.num_samples < batch_size * world_size:
        raise DataError(f"FFCV dataset {source} has {info.num_samples} samples, fewer than one global "
                        f"batch (batch_size {batch_size} x world_size {world_size})")
    if workers is None or workers < 1:
        workers = default_workers(cap=numba.config.NUMBA_NUM_THREADS)
    elif workers > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"workers must be at most {numba.config.NUMBA_NUM_THREADS} (numba's thread pool, "
                         f"NUMBA_NUM_THREADS), got {workers}")
    if cache_dir is not None:
        _cache_kernels_in(cache_dir)

    epoch_cell = np.zeros(1, dtype=np.int64)
    params = window_params(crop_scale, crop_ratio, flip_prob)
    # ToDevice only off the CPU: on the CPU it would be one more copy of every batch.
    to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    pipelines = {name: None for name in info.field_names}  # no default pipeline for any field
    decoder = TwoViewDecoder(image_size, params, seed, interpolation, epoch_cell)
    pipelines["views"] = PipelineSpec(info.image_field, decoder, [ToTensor(), *to_device])
    with mock.patch.object(ffcv.loader.loader, "OSCacheManager", _OSCacheManager):
        loader = Loader(info.path, batch_size, num_workers=workers, os_cache=os_cache, order=ORDERS[order],
                        distributed=False, seed=seed, pipelines=pipelines, drop_last=True,
                        batches_ahead=batches_ahead)
    quasi = loader.traversal_order if order == "quasi_random" else None
    shard_order = ShardOrder(info.num_samples, batch_size, rank, world_size, seed, quasi)
    return FFCVLoader(loader, shard_order, epoch_cell, info, params, seed, device)


class ShardOrder:
    """The samples one rank loads in an epoch.

    "random": ``default_rng([seed, epoch]).permutation``, cut to whole global batches, every
    world_size-th sample from ``rank`` (the torch backend's assignment). With ``quasi`` (FFCV's
    QuasiRandom traversal order, one process only) its order instead.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 quasi=None):
        self.num_samples, self.batch_size, self.seed, self.quasi = num_samples, batch_size, seed, quasi
        self.rank, self.world_size = rank, world_size
        self.steps = num_samples // (batch_size * world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [steps * batch_size]: this rank's samples of ``epoch``, in order."""
        if self.quasi is not None:  # one process only (world_size 1 is checked)
            return np.asarray(self.quasi.sample_order(epoch), dtype=np.int64)[: self.steps * self.batch_size]
        return epoch_shard(self.num_samples, self.batch_size, self.rank, self.world_size, self.seed, epoch)


class FFCVLoader:
    """Iterable of :class:`Batch` on ``device``; ``len()`` = steps per epoch on this rank.

    FFCV decodes and cuts the views; the crops, indices and labels of a batch are computed here from
    the batch's indices (the order is known in advance), with the same :func:`crop_window` draws.
    Without :meth:`set_epoch`, successive passes are epochs 0, 1, 2, ... (as FFCV's Loader). One pass
    at a time: starting a pass ends the one before it.
    """

    def __init__(self, loader: Loader, order: ShardOrder, epoch_cell: np.ndarray, info: BetonInfo,
                 params: tuple, seed: int, device: torch.device):
        self.loader, self.order, self.info, self.device = loader, order, info, device
        self._epoch_cell, self._params, self._seed = epoch_cell, params, seed
        self._heights = info.images["height"].astype(np.int64)  # of the stored images, as the decoder
        self._widths = info.images["width"].astype(np.int64)
        self._epoch, self._skip, self._running = 0, 0, None

    def __len__(self) -> int:
        return self.order.steps

    skipped = 0  # the writer checked every image: a .beton holds no unreadable one

    def close(self) -> None:
        """End a pass that is still loading (a consumer that stopped early); the next pass starts a new one."""
        _stop(self._running)
        self._running = None

    def fingerprint(self) -> dict:
        """The data: sample count and a hash of the stored image sizes (the .beton's own listing)."""
        return fingerprint((f"{h}x{w}" for h, w in zip(self._heights, self._widths)), self.info.num_samples)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Iterate ``epoch`` next, starting at step ``skip_batches`` (the rest of the epoch only)."""
        check_position(epoch, skip_batches, len(self))
        self._epoch, self._skip = epoch, skip_batches

    def __iter__(self):
        _stop(self._running)  # an abandoned pass must not read the next epoch's number
        epoch, skip, batch_size = self._epoch, self._skip, self.order.batch_size
        self._epoch, self._skip = epoch + 1, 0
        self._epoch_cell[0] = epoch  # read by the compiled decoder at every batch
        order = self.order.epoch_order(epoch)[skip * batch_size :]  # skipped batches: never loaded
        self._running = running = _EpochThread(self.loader, order)
        try:
            for step, (views,) in enumerate(running):  # views: [N, 2, S, S, 3]
                index = order[step * batch_size : (step + 1) * batch_size]  # [N]
                crops = crop_rows(index, self._heights[index], self._widths[index], self._seed, epoch,
                                  self._params)  # [N, 2, 5]
                yield Batch(view_q=views[:, 0].permute(0, 3, 1, 2), view_k=views[:, 1].permute(0, 3, 1, 2),
                            crop_q=self._small(crops[:, 0]), crop_k=self._small(crops[:, 1]),
                            index=self._small(index),
                            label=None if self.info.labels is None else self._small(self.info.labels[index]))
            if running.error is not None:
                raise RuntimeError(f"FFCV's loading thread failed in epoch {epoch}: {running.error!r}") \
                    from running.error
        finally:
            _stop(running)

    def _small(self, array: np.ndarray) -> torch.Tensor:
        # A few bytes per sample: a plain copy (pinning it would cost more than it saves).
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)


class _EpochThread(EpochIterator):
    """FFCV's loading thread for one epoch (it starts at once), except that a failure ends the epoch
    and is kept in ``error`` for the consumer; FFCV's own thread dies and leaves the consumer waiting."""

    error: Optional[BaseException] = None

    def run(self):
        try:
            super().run()
        except BaseException as error:  # noqa: BLE001 (re-raised by the consumer)
            self.error = error
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(None, timeout=0.5)  # ends the consumer's loop
                    return
                except queue.Full:
                    pass


def _stop(running: Optional[_EpochThread]) -> None:
    """End an epoch thread that is still running: two would share numba's thread pool."""
    if running is None:
        return
    running.iter_ixes = iter(())  # it finishes the batch at hand, then ends
    running.terminate_event.set()
    while running.is_alive():
        try:
            running.output_queue.get(timeout=0.05)  # unblock its put
        except queue.Empty:
            pass
    running.close()


class _OSCacheManager(OSCacheManager):
    """FFCV's page-cache reader, typed without its side effect: FFCV 1.0.2 sets ``mutable = False``
    on numba's *interned* ``uint8[::1]`` type, which changes that type's hash inside every dict that
    holds it (the next loader of the process fails to compile; numba's finalisers raise at exit)."""

    def compile_reader(self):
        data = numba.types.Array(numba.uint8, 1, "C", readonly=True)  # what FFCV meant
        state = numba.types.Tuple([data, numba.uint64[::1], numba.uint64[::1]])

        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address : address + size]

        return Compiler.compile(read, data(numba.uint64, state))


def _check_args(batch_size, image_size, rank, world_size, seed, crop_scale, crop_ratio, flip_prob,
                order, batches_ahead, interpolation) -> None:
    check_common_args(batch_size, image_size, rank, world_size, seed, crop_scale, crop_ratio, flip_prob)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "quasi_random" and world_size > 1:
        raise ValueError("order 'quasi_random' needs world_size 1 (FFCV has no distributed quasi-random "
                         f"order), got world_size {world_size}; use order 'random'")
    if batches_ahead < 1:
        raise ValueError(f"batches_ahead must be >= 1, got {batches_ahead}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if interpolation != "area" and not HAS_LINEAR:
        raise ValueError(f"interpolation {interpolation!r} needs OpenCV's C API (cvResize), which the OpenCV "
                         "FFCV was built against lacks; use interpolation 'area'")
