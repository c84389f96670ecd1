"""The FFCV backend's compiled parts: the two-view decoder Operation and the numba kernels it runs.

Inside FFCV's compiled (numba) pipeline, :class:`TwoViewDecoder` decodes a sample with FFCV's
libjpeg-turbo ``imdecode`` (or reads it raw) and cuts both views from that one decode: a
torchvision-style random resized crop of an integer pixel window, resized by the OpenCV FFCV links
(:func:`cut_view`: INTER_AREA, as FFCV's own RandomResizedCropRGBImageDecoder, where a view shrinks
its window 2x or more; the several times cheaper INTER_LINEAR below that), mirrored if flipped. Any
mix of image sizes works.

Randomness is a pure function of (seed, epoch, dataset index, view) — a counter-based hash, not
numba's per-thread generator — so the views do not depend on the number of threads or ranks, and
:func:`crop_rows` recomputes exactly the windows the decoder cut from a batch's indices (a second
compiled decoder for them would cost seconds of compile time). The epoch reaches the compiled
decoder through a one-element array it reads at every batch, so a new epoch needs no recompilation.

Compilation: FFCV compiles the decoder with numba at the first batch, once per loader (a few
seconds). That code calls ctypes functions and is built from closures, so numba cannot cache it on
disk; the kernels here (windows, random draws, mirroring) are cached (``cache=True``) in the
directory given to :func:`_cache_kernels_in` or numba's default place (``NUMBA_CACHE_DIR``, else
``__pycache__`` next to this file), and the ctypes wrappers are compiled once per process.

The loader around them (order, sharding, :class:`pipelines.Batch` assembly) is
:mod:`pipelines.ffcv_loader`.
"""
from __future__ import annotations

import ctypes
import math
import os
from dataclasses import replace

import ffcv._libffcv
import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

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

