"""The FFCV backend: a ``.beton`` file -> :class:`pipelines.Batch`, decoding each JPEG once.

Inside FFCV's compiled (numba) pipeline, :class:`TwoViewDecoder` decodes a sample with FFCV's
libjpeg-turbo ``imdecode`` (or reads it raw) and cuts both views from that one decode: a
torchvision-style random resized crop of an integer pixel window, resized by the OpenCV FFCV links
(:func:`cut_view`: INTER_AREA, as FFCV's own RandomResizedCropRGBImageDecoder, where a view shrinks
its window 2x or more; the several times cheaper INTER_LINEAR below that), mirrored if flipped. Any
mix of image sizes works.

Randomness is a pure function of (seed, epoch, dataset index, view) — a counter-based hash, not
numba's per-thread generator — so the views do not depend on the number of threads or ranks, and
the windows the decoder cut are recomputed exactly for ``Batch.crop_q / crop_k`` from the batch's
indices (:func:`crop_rows`; a second compiled decoder for them would cost seconds of compile time).
The epoch reaches the compiled decoder through a one-element array it reads at every batch, so a new
epoch needs no recompilation.

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
seconds). That code calls ctypes functions and is built from closures, so numba cannot cache it on
disk; our own kernels (windows, random draws, mirroring) are cached (``cache=True``) in ``cache_dir``
or numba's default place (``NUMBA_CACHE_DIR``, else ``__pycache__`` next to this file), and the
ctypes wrappers are compiled once per process. FFCV sets torch's intra-op thread count to ``workers``.
"""
from __future__ import annotations

import ctypes
import math
import os
import queue
from dataclasses import replace
from typing import Optional
from unittest import mock

import ffcv._libffcv
import ffcv.loader.loader
import numba
import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.memory_managers import OSCacheManager
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.transforms import ToDevice, ToTensor

from pipelines import Batch, check_common_args, check_position
from pipelines.ffcv_writer import BetonInfo, check_beton
from pipelines.sources import DataError

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM}
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64 increment (2^64 / golden ratio)


# ---- randomness and geometry: pure functions of (seed, epoch, index, view), cached by numba

@numba.njit(cache=True)
def _mix(z):
    """splitmix64's finaliser: a bijective uint64 hash."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def sample_key(seed, epoch, index):
    """uint64 key of one sample's draws in one epoch."""
    z = _mix(np.uint64(seed) + _GAMMA)
    z = _mix(z ^ (np.uint64(epoch) + _GAMMA))
    return _mix(z ^ (np.uint64(index) + _GAMMA))


@numba.njit(cache=True)
def _uniform(key, counter):
    """The counter-th uniform draw in [0, 1) of ``key`` (53 random bits)."""
    return float(_mix(key + np.uint64(counter + 1) * _GAMMA) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True)
def crop_window(height, width, params, key, view):
    """torchvision's RandomResizedCrop window (10 tries, then a central crop) and a flip for view 0 or
    1, drawn from ``key``. params: (scale low, scale high, log ratio low, log ratio high, flip_prob).
    -> (top, left, crop height, crop width, flipped) in source pixels."""
    scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, flip_prob = params
    base = view * 64  # 4 draws per try, 10 tries, then the flip: well inside 64 counters per view
    flipped = _uniform(key, base + 63) < flip_prob
    area = float(height) * float(width)
    for attempt in range(10):
        target_area = area * (scale_lo + _uniform(key, base + 4 * attempt) * (scale_hi - scale_lo))
        log_aspect = log_ratio_lo + _uniform(key, base + 4 * attempt + 1) * (log_ratio_hi - log_ratio_lo)
        aspect = math.exp(log_aspect)
        w = int(math.floor(math.sqrt(target_area * aspect) + 0.5))
        h = int(math.floor(math.sqrt(target_area / aspect) + 0.5))
        if 0 < w <= width and 0 < h <= height:
            top = int(_uniform(key, base + 4 * attempt + 2) * (height - h + 1))
            left = int(_uniform(key, base + 4 * attempt + 3) * (width - w + 1))
            return top, left, h, w, flipped
    w, h = width, height
    if float(width) / float(height) < math.exp(log_ratio_lo):
        h = int(math.floor(width / math.exp(log_ratio_lo) + 0.5))
    elif float(width) / float(height) > math.exp(log_ratio_hi):
        w = int(math.floor(height * math.exp(log_ratio_hi) + 0.5))
    return (height - h) // 2, (width - w) // 2, h, w, flipped


@numba.njit(cache=True)
def crop_rows(indices, heights, widths, seed, epoch, params):
    """The ``Batch.crop`` rows of both views of samples ``indices`` (int64 [N]; heights, widths: int64
    [N] of their stored images) -> float32 [N, 2, 5] = x0, y0, x1, y1 (fractions), flipped."""
    out = np.empty((len(indices), 2, 5), dtype=np.float32)
    for i in range(len(indices)):
        key = sample_key(seed, epoch, indices[i])
        height, width = heights[i], widths[i]
        for v in range(2):
            top, left, h, w, flipped = crop_window(height, width, params, key, v)
            out[i, v, 0] = left / width
            out[i, v, 1] = top / height
            out[i, v, 2] = (left + w) / width
            out[i, v, 3] = (top + h) / height
            out[i, v, 4] = 1.0 if flipped else 0.0
    return out


@numba.njit(cache=True)
def _mirror(view):
    """Flip an [S, S, 3] view horizontally, in place."""
    size = view.shape[1]
    for row in range(view.shape[0]):
        for col in range(size // 2):
            mirror = size - 1 - col
            for c in range(3):
                view[row, col, c], view[row, mirror, c] = view[row, mirror, c], view[row, col, c]


_CACHED_KERNELS = (_mix, sample_key, _uniform, crop_window, crop_rows, _mirror)


def window_params(crop_scale, crop_ratio, flip_prob) -> tuple:
    """The ``params`` of :func:`crop_window` (five floats)."""
    return (float(crop_scale[0]), float(crop_scale[1]), math.log(crop_ratio[0]), math.log(crop_ratio[1]),
            float(flip_prob))


# ---- cutting a view: OpenCV's resize (the build FFCV links), called through ctypes as FFCV does

INTERPOLATIONS = {"auto": 0, "linear": 1, "area": 2}
_CV_8UC3, _CV_INTER_LINEAR = 16, 1
# dlsym through FFCV's library finds the C API of the OpenCV it links; a handle of our own, so that
# our argtypes do not touch FFCV's.
_opencv = ctypes.CDLL(ffcv._libffcv.__file__)
_cv_init_header = getattr(_opencv, "cvInitMatHeader", None)
_cv_resize = getattr(_opencv, "cvResize", None)
HAS_LINEAR = _cv_init_header is not None and _cv_resize is not None  # OpenCV 5 has no C API
if HAS_LINEAR:
    _cv_init_header.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_int]
    _cv_init_header.restype = ctypes.c_void_p
    _cv_resize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    _cv_resize.restype = None


def _resize_linear(source, top, left, height, width, destination):
    """cv::resize(INTER_LINEAR) of the window of ``source`` [H, W, 3] into ``destination`` [S, S, 3]."""
    headers = np.empty((2, 64), dtype=np.uint8)  # two CvMat headers (40 bytes each on 64-bit)
    row = source.shape[1] * 3
    corner = source.ctypes.data + np.uint64(top * row + left * 3)  # uint64 throughout: no float mixing
    _cv_init_header(headers[0].ctypes.data, height, width, _CV_8UC3, corner, row)
    _cv_init_header(headers[1].ctypes.data, destination.shape[0], destination.shape[1], _CV_8UC3,
                    destination.ctypes.data, destination.shape[1] * 3)
    _cv_resize(headers[0].ctypes.data, headers[1].ctypes.data, _CV_INTER_LINEAR)


# Compiled once per process and shared by every loader (FFCV compiles its own per loader).
_imdecode = Compiler.compile(imdecode)
_resize_area = Compiler.compile(resize_crop)  # FFCV's: cv::resize(INTER_AREA)
_resize_linear_c = Compiler.compile(_resize_linear) if HAS_LINEAR else _resize_area


@numba.njit(nogil=True)
def cut_view(image, top, left, h, w, flipped, interpolation, view):
    """Resize the window ``[top:top + h, left:left + w]`` of ``image`` [H, W, 3] into ``view``
    [S, S, 3], then mirror it if ``flipped``. interpolation: INTERPOLATIONS' value; "auto" is
    OpenCV's INTER_AREA (antialiased) from a 2x shrink on, INTER_LINEAR (cheaper) below it."""
    shrink = max(h / view.shape[0], w / view.shape[1])
    if interpolation == 2 or (interpolation == 0 and shrink >= 2.0):
        _resize_area(image, top, top + h, left, left + w, view)
    else:
        _resize_linear_c(image, top, left, h, w, view)
    if flipped:
        _mirror(view)


# ---- the FFCV operation: two views from one decode

class TwoViewDecoder(SimpleRGBImageDecoder):
    """Decode each image once (libjpeg-turbo, or read raw pixels in place) and cut both views
    -> uint8 [N, 2, S, S, 3].

    Like FFCV's RandomResizedCropRGBImageDecoder (any mix of image sizes; a per-sample decode buffer
    of the largest image; an integer window resized by OpenCV) but two windows and flips per decode,
    drawn by :func:`crop_window` and cut by :func:`cut_view`. ``epoch_cell`` (int64 [1], owned by
    :class:`FFCVLoader`) is read at every batch, so a new epoch needs no recompilation.
    """

    def __init__(self, image_size: int, params: tuple, seed: int, interpolation: str, epoch_cell: np.ndarray):
        super().__init__()
        self.image_size, self.params, self.seed = image_size, params, seed
        self.interpolation = INTERPOLATIONS[interpolation]
        self.epoch_cell = epoch_cell  # kept alive as long as the compiled code reads it

    def declare_state_and_memory(self, previous_state):
        shape = (2, self.image_size, self.image_size, 3)
        jpg = self.metadata["mode"] == IMAGE_MODES["jpg"]
        pixels = self.metadata["height"].astype(np.uint64) * self.metadata["width"].astype(np.uint64)
        largest = int(pixels[jpg].max()) if jpg.any() else 1
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")),
                (AllocationQuery(shape, np.dtype("u1")), AllocationQuery((3 * largest,), np.dtype("u1"))))

    def generate_code(self):
        jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        seed, params, interpolation = self.seed, self.params, self.interpolation
        epoch_address = self.epoch_cell.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            views, decode_buffers = my_storage  # [B, 2, S, S, 3], [B, 3 * largest]
            epoch = np.empty(1, dtype=np.int64)
            ctypes_memcopy(epoch_address, epoch.ctypes.data, 8)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.int64(field["height"]), np.int64(field["width"])
                if field["mode"] == jpg:
                    image = decode_buffers[dst_ix]
                    _imdecode(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                key = sample_key(seed, epoch[0], source_ix)
                for v in range(2):
                    top, left, h, w, flipped = crop_window(height, width, params, key, v)
                    cut_view(image, top, left, h, w, flipped, interpolation, views[dst_ix, v])
            return views[: len(batch_indices)]

        decode.is_parallel = True
        return decode


# ---- the loader

def build_ffcv_loader(
    source: str, *, batch_size: int, image_size: int, device: torch.device, rank: int = 0,
    world_size: int = 1, seed: int = 0, workers: Optional[int] = None,
    crop_scale: tuple[float, float] = (0.2, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
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
    cache_dir: where numba caches this module's kernels (process-wide; None: numba's default).
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
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = max(1, min(numba.config.NUMBA_NUM_THREADS,
                             (cpus or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
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
        if self.quasi is not None:
            order = np.asarray(self.quasi.sample_order(epoch), dtype=np.int64)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return order[: self.steps * self.batch_size * self.world_size][self.rank :: self.world_size]


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


def _cache_kernels_in(cache_dir: str) -> None:
    """Point numba's on-disk cache of this module's kernels at ``cache_dir`` (process-wide)."""
    os.makedirs(cache_dir, exist_ok=True)
    previous = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = cache_dir
    try:
        for kernel in _CACHED_KERNELS:
            kernel.enable_caching()  # the cache locator reads config.CACHE_DIR here
    finally:
        numba.config.CACHE_DIR = previous


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
