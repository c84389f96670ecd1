"""DALI backend: each image decoded once (on the GPU where there is one), both views cut from it.

Per sample (``_two_views``)::

    encoded bytes --peek_image_shape--> [H, W] from the header (CPU: windows drawn while the GPU decodes)
                  --decoders.image-->   one RGB image: "mixed" = nvJPEG on the GPU, using the card's
                                        hardware JPEG decoder for ``hw_decoder_load`` of the images
                                        where it has one (A100, H100); "cpu" = libjpeg-turbo
    per view:     random_crop_generator([H, W]) -> window (y0, x0, h, w) on the source pixel grid
                  resize(roi=window, S x S, antialiased linear)  # crop + resize in one pass
                  crop_mirror_normalize(mirror=coin, uint8, CHW) # flip + layout; no normalisation

The window reported in ``crop_q / crop_k`` is the ROI handed to ``resize``, so it is exactly what was
cut. ``random_crop_generator`` draws like torchvision's RandomResizedCrop (area fraction uniform in
``crop_scale``, aspect log-uniform in ``crop_ratio``, 10 tries, integer window, uniform position); only
the fallback after 10 failed tries differs (the largest in-range window at a random position instead
of a centred one). EXIF orientation is ignored, as PIL's ``Image.open`` (used
by the other backends) does, so every backend sees the same pixels.

CPU-only mode (``device_id=None`` in DALI, the only value that works without CUDA) runs the same
graph with the "cpu" decoder: chosen when ``device`` is not CUDA, or forced with ``cpu_only=True``
(the ``dali-cpu`` backend). GPU mode runs on ``device``'s index; views arrive on that GPU.

Order, sharding and resume (image folders and lists). DALI's readers shuffle inside a window of
``initial_fill`` samples (``random_shuffle``) or reshuffle the whole list after each epoch by advancing
their own state (``shuffle_after_epoch``); neither can start epoch e at step k from (seed, e, k) alone,
which resuming from a checkpoint needs. So the order is ours, identical to the torch backend's: epoch
e is the permutation ``default_rng([seed, e])``; global step b takes its images b*G..(b+1)*G
(G = batch_size x world_size, the last partial global batch dropped) and rank r every world_size-th of
them, so ranks are disjoint, cover the epoch and take ``len()`` steps each. Each epoch (and each resume)
builds a pipeline whose ``readers.file`` reads this rank's remaining files in that order (a list file;
no DALI shuffle or sharding: the list is the shard, a multiple of the batch, so no padding), so
``set_epoch(e, skip_batches=k)`` starts at step k of epoch e without reading the skipped images: the
same samples in the same order as the uninterrupted run. The random crops after the resume point are
fresh draws (DALI's random streams cannot be rewound per sample). Crop seed: (seed + rank, epoch, step).

Webdataset shards (``source`` = one ``.tar``, a folder of them or a brace / glob pattern; what is read
and how the shards are indexed: ``pipelines.dali_webdataset``). Each epoch the tar order is permuted
with (seed, epoch), the same on every rank, and DALI shards the sample stream (``shard_id=rank``,
``num_shards=world_size``: contiguous chunks, ``pad_last_batch``), shuffling within ``shuffle_buffer``
samples; every rank stops after ``len()`` steps. Resume builds the epoch's pipeline (all seeds fixed by
(seed, rank, epoch)) and drops the first ``skip_batches`` batches: exact, views included, at the cost
of decoding them. ``index`` is None (DALI does not report a sample's position).

Iteration goes through ``DALIGenericIterator`` with ``LastBatchPolicy.DROP`` and ``reader_name``.

Bad images. DALI cannot skip a sample it fails to decode: the iteration stops with an error. The
loader then finds the file (``pipelines.dali_bad_images``): DALI's message names it for broken JPEGs;
otherwise the images of the failing step are decoded with PIL. With ``strict_data=True`` (and always
for webdataset) it raises :class:`DataError` naming the file (``tar:offset:member`` for shards).
Otherwise (image folders and lists) the file is replaced, from then on, by the nearest earlier good
image of the same rank and epoch (so other ranks are unaffected), counted in ``skipped`` /
``skipped_paths``, and the epoch continues from the failed step in a new pipeline. A missing path, an
empty source or a pattern that matches nothing raises :class:`DataError` before any pipeline is built.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import weakref
from typing import Optional

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines import CROP_RATIO, CROP_SCALE, Batch, check_common_args, check_position, default_workers, epoch_shard
from pipelines.dali_bad_images import check_images, named_in_message
from pipelines.dali_webdataset import (WDS_IMAGE_EXT, count_shards, parse_labels, read_shards, shard_samples,
                                       tar_shards)
from pipelines.sources import DataError, ImageList, fingerprint, list_images

READER = "reader"
# extra: dataset index (image folders and lists) or the label's bytes (webdataset)
OUTPUTS = ["view_q", "geometry_q", "view_k", "geometry_k", "extra"]
MAX_SKIPPED_PATHS = 20


def build_dali_loader(
    source: str, *, batch_size: int, image_size: int, device: torch.device, rank: int = 0,
    world_size: int = 1, seed: int = 0, workers: Optional[int] = None,
    crop_scale: tuple[float, float] = CROP_SCALE, crop_ratio: tuple[float, float] = CROP_RATIO,
    flip_prob: float = 0.5, prefetch: int = 2, cpu_only: Optional[bool] = None, strict_data: bool = False,
    hw_decoder_load: float = 0.65, shuffle_buffer: int = 4096, timeout: float = 0.0, **unused,
) -> "DaliLoader":
    """The DALI loader (protocol: ``pipelines`` docstring; behaviour: this module's docstring).

    workers: DALI CPU threads (None or < 0: CPUs per local rank). prefetch: batches DALI runs ahead.
    cpu_only: None = decode on the GPU iff ``device`` is CUDA; True = CPU decode (then copy to device).
    hw_decoder_load: share of JPEGs sent to the hardware decoder (GPU mode, cards that have one).
    shuffle_buffer: webdataset shuffle window, in samples.
    timeout: not used (the torch backend's wait for a worker process; DALI decodes in this process).
    """
    if unused:
        warnings.warn(f"the dali backend ignores the options {sorted(unused)}", stacklevel=2)
    check_common_args(batch_size, image_size, rank, world_size, seed, crop_scale, crop_ratio, flip_prob)
    _check_args(crop_scale=crop_scale, prefetch=prefetch, hw_decoder_load=hw_decoder_load,
                shuffle_buffer=shuffle_buffer)
    device = torch.device(device)
    gpu = device.type == "cuda" if cpu_only is None else not cpu_only
    if gpu and device.type != "cuda":
        raise ValueError(f"cpu_only=False needs a CUDA device, got device {device}")
    if workers is None or workers < 0:
        workers = default_workers()
    tars = tar_shards(str(source))
    images = None if tars is not None else list_images(source)
    device_id = (torch.cuda.current_device() if device.index is None else device.index) if gpu else None
    return DaliLoader(
        images, tars, source=str(source), device=device, gpu=gpu, batch_size=batch_size, rank=rank,
        world_size=world_size, seed=seed, strict_data=strict_data, shuffle_buffer=shuffle_buffer,
        pipeline_args=dict(batch_size=batch_size, num_threads=max(1, workers), prefetch_queue_depth=prefetch,
                           device_id=device_id),
        view_args=dict(image_size=image_size, crop_scale=list(crop_scale), crop_ratio=list(crop_ratio),
                       flip_prob=flip_prob, gpu=gpu, hw_decoder_load=hw_decoder_load))


def build_dali_cpu_loader(source: str, **kwargs) -> "DaliLoader":
    """The DALI loader in CPU-only mode (CI, laptops): CPU decode, batches copied to ``device``."""
    return build_dali_loader(source, **{**kwargs, "cpu_only": True})


def _two_views(encoded, *, image_size, crop_scale, crop_ratio, flip_prob, gpu, hw_decoder_load):
    """Encoded images -> [view_q, geometry_q, view_k, geometry_k]; the image is decoded once.

    view: uint8 [3, S, S]; geometry: int32 [7] = y0, x0, h, w (window, source pixels), H, W, flipped.
    """
    shape = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.INT32)  # [H, W, C]
    extra = {"hw_decoder_load": hw_decoder_load} if gpu else {}
    image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                              adjust_orientation=False, **extra)  # [H, W, 3] uint8
    outputs = []
    for _ in range(2):
        anchor, extent = fn.random_crop_generator(shape, random_area=crop_scale,
                                                  random_aspect_ratio=crop_ratio)  # int32 [2] (y, x), (h, w)
        flipped = fn.random.coin_flip(probability=flip_prob, dtype=types.INT32)  # int32 []
        start = fn.cast(anchor, dtype=types.FLOAT)
        view = fn.resize(image, roi_start=start, roi_end=start + fn.cast(extent, dtype=types.FLOAT),
                         size=[image_size, image_size], antialias=True)  # [S, S, 3]
        view = fn.crop_mirror_normalize(view, mirror=flipped, dtype=types.UINT8,
                                        output_layout="CHW")  # [3, S, S]
        outputs += [view, fn.cat(anchor, extent, shape[0:2], fn.reshape(flipped, shape=[1]))]  # geometry [7]
    return outputs


@pipeline_def
def _files_pipeline(reader_args, view_args):
    # no shuffle: ours is the order. dont_use_mmap: a file truncated or replaced while it is read is
    # then a read error DALI reports, not a SIGBUS that kills the process without a message.
    encoded, index = fn.readers.file(name=READER, dont_use_mmap=True, **reader_args)
    return tuple(_two_views(encoded, **view_args)) + (index,)


@pipeline_def
def _shards_pipeline(reader_args, view_args):
    encoded, *label = read_shards(name=READER, **reader_args)
    extra = fn.pad(label[0], fill_value=0) if label else fn.cast(encoded.shape()[0:0], dtype=types.UINT8)
    return tuple(_two_views(encoded, **view_args)) + (extra,)


class DaliLoader:
    """Iterable of :class:`Batch` on ``device``; ``len()`` = steps per epoch on this rank.

    skipped: unreadable images replaced so far (every occurrence); skipped_paths: the first
    ``MAX_SKIPPED_PATHS`` distinct ones, as (path, reason).
    """

    def __init__(self, images: Optional[ImageList], tars: Optional[list[str]], *, source, device, gpu,
                 batch_size, rank, world_size, seed, strict_data, shuffle_buffer, pipeline_args, view_args):
        self.images, self.tars, self.device, self.gpu = images, tars, device, gpu
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.strict_data, self.shuffle_buffer = strict_data, shuffle_buffer
        self.pipeline_args, self.view_args = pipeline_args, view_args
        self.epoch, self.skip_batches = 0, 0
        self.skipped, self.skipped_paths = 0, []
        self._bad: dict[int, str] = {}  # dataset index -> reason, found by this rank
        self._tmp = tempfile.mkdtemp(prefix="maskco-dali-")  # epoch file lists, webdataset indices
        weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        if images is not None:
            self.size, self._labels = len(images), torch.tensor(images.labels, dtype=torch.int64)
            self._paths = [os.path.abspath(path) for path in images.paths]  # a list file's are relative to it
            self._listable = not any("\n" in p or p != p.rstrip() for p in self._paths)
        else:
            self.size, self._labelled, self._index_paths = count_shards(tars, self._tmp)
        if self.size < batch_size * world_size:
            raise DataError(f"data source {source} has {self.size} images, fewer than one global batch "
                            f"(batch_size {batch_size} x world_size {world_size})")

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def close(self) -> None:
        """Nothing to release between passes: each pass builds its DALI pipelines and frees them as it ends
        (also when the consumer stops early); the temporary folder goes with the loader."""

    def fingerprint(self) -> dict:
        """The data: image count and a hash of the listing (the images, or the shards' names)."""
        return fingerprint(self._paths if self.images is not None else self.tars, self.size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Iterate ``epoch`` next, starting at step ``skip_batches`` (until the next set_epoch)."""
        check_position(epoch, skip_batches, len(self))
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        step = self.skip_batches
        while step < len(self):
            pipe, position, mine = self._pipeline(step)  # position: the epoch step of its first batch
            iterator = DALIGenericIterator(pipe, OUTPUTS, reader_name=READER, prepare_first_batch=False,
                                           last_batch_policy=LastBatchPolicy.DROP)
            try:
                while step < len(self):
                    try:
                        out = next(iterator)[0]
                    except RuntimeError as error:
                        self._locate(error, position, mine)  # raises unless it found files to replace
                        break  # rebuild from this step, those files replaced
                    position += 1
                    if position > step:  # else: a skipped batch of a resumed webdataset epoch
                        yield self._batch(out, step, mine)
                        step += 1
            finally:
                del iterator, pipe  # frees DALI's threads and buffers, also when the consumer stops early

    # ---- pipelines of one epoch

    def _seed(self, *words: int) -> int:
        return int(np.random.SeedSequence([self.seed + self.rank, *words]).generate_state(1)[0] >> 1)

    def _mine(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's dataset indices for the epoch, step-major, with known-bad images replaced."""
        mine = epoch_shard(self.size, self.batch_size, self.rank, self.world_size, self.seed, self.epoch)
        replaced = np.isin(mine, list(self._bad))
        good = np.flatnonzero(~replaced)
        if replaced.any():
            if good.size == 0:
                raise DataError(f"every image of rank {self.rank} in epoch {self.epoch} is unreadable, e.g. "
                                f"{self._paths[mine[0]]}")
            # nearest earlier good image (the first good one for a leading run)
            source = good[np.clip(np.searchsorted(good, np.arange(mine.size), side="right") - 1, 0, None)]
            mine = np.where(replaced, mine[source], mine)
        return mine, replaced

    def _pipeline(self, step: int):
        """-> (pipeline, the epoch step it starts at (``step``, 0 for shards), (indices, replaced) or None)."""
        if self.images is not None:
            mine, replaced = self._mine()
            rest = mine[step * self.batch_size :]  # "label" = dataset index
            if self._listable:  # DALI parses a list file ~5x faster than it converts a Python list
                reader_args = {"file_list": os.path.join(self._tmp, "epoch.txt")}
                with open(reader_args["file_list"], "w", encoding="utf-8") as handle:
                    handle.writelines(f"{self._paths[i]} {i}\n" for i in rest)
            else:
                reader_args = {"files": [self._paths[i] for i in rest], "labels": rest.tolist()}
            pipe = _files_pipeline(reader_args, self.view_args, seed=self._seed(self.epoch, step),
                                   **self.pipeline_args)
            return pipe, step, (mine, replaced)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.tars))
        return _shards_pipeline(self._reader_args(order), self.view_args, seed=self._seed(self.epoch),
                                **self.pipeline_args), 0, None

    def _reader_args(self, order: np.ndarray) -> dict:
        ext = [WDS_IMAGE_EXT] + (["cls"] if self._labelled else [])
        args = dict(paths=[self.tars[i] for i in order], ext=ext,
                    case_sensitive_extensions=False, missing_component_behavior="skip",
                    shard_id=self.rank, num_shards=self.world_size, pad_last_batch=True,
                    random_shuffle=True, initial_fill=self.shuffle_buffer, seed=self._seed(self.epoch, 1))
        return {**args, "index_paths": [self._index_paths[i] for i in order]}

    # ---- outputs

    def _batch(self, out: dict, step: int, mine) -> Batch:
        if mine is not None:
            index = out["extra"].view(-1).to(torch.int64)  # [N]
            label = self._labels[index]
            self.skipped += int(mine[1][step * self.batch_size : (step + 1) * self.batch_size].sum())
        else:
            index, label = None, parse_labels(out["extra"].cpu())
        batch = Batch(view_q=out["view_q"], view_k=out["view_k"], crop_q=_crops(out["geometry_q"]),
                      crop_k=_crops(out["geometry_k"]), index=index, label=label)
        return batch.to(self.device, non_blocking=True)

    # ---- bad images

    def _locate(self, error: RuntimeError, step: int, mine) -> None:
        """Find the images that made DALI fail at ``step``: raise DataError, or mark them to replace."""
        # DALI reports a failure with the batch that failed; its prefetched successors are checked too
        window = 1 + self.pipeline_args["prefetch_queue_depth"]
        steps = slice(step * self.batch_size, (step + window) * self.batch_size)
        bad = named_in_message(str(error))
        if mine is None:  # webdataset: read the stream again up to there, without decoding
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.tars))
            bad = bad or check_images(shard_samples(self._reader_args(order), self.batch_size, steps))
            if bad:
                raise DataError(f"cannot decode webdataset sample {bad[0][0]} ({bad[0][1]}); rewrite that "
                                "shard (webdataset samples cannot be skipped)") from error
            raise error
        paths = {self._paths[i]: int(i) for i in mine[0][steps]}
        named = dict(bad)
        bad = [(p, named[p]) for p in paths if p in named] + check_images(
            (p, lambda p=p: open(p, "rb").read()) for p in paths if p not in named)
        if not bad:
            raise RuntimeError(f"DALI failed at step {step} of epoch {self.epoch} on rank {self.rank} (error "
                               "above); PIL reads all images of that step, so none was replaced") from error
        if self.strict_data:
            raise DataError(f"cannot decode image {bad[0][0]} ({bad[0][1]}); strict_data=False replaces "
                            "unreadable images instead") from error
        for path, reason in bad:
            self._bad[paths[path]] = reason
            if len(self.skipped_paths) < MAX_SKIPPED_PATHS:
                self.skipped_paths.append((path, reason))
            warnings.warn(f"skipping unreadable image {path} ({reason}); replaced by another image "
                          "(strict_data=True stops instead)", stacklevel=3)


def _crops(geometry: torch.Tensor) -> torch.Tensor:
    """int32 [N, 7] (y0, x0, h, w, H, W, flipped) -> float32 [N, 5] (x0, y0, x1, y1 in [0, 1], flipped)."""
    y0, x0, h, w, height, width, flipped = geometry.double().unbind(1)  # [N] each
    return torch.stack([x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height, flipped], 1).float()


def _check_args(**args) -> None:
    """DALI's own options (the shared ones are checked by pipelines.check_common_args)."""
    checks = {
        "crop_scale": args["crop_scale"][1] <= 1,  # random_crop_generator draws areas within the image
        "prefetch": args["prefetch"] >= 1,
        "hw_decoder_load": 0 <= args["hw_decoder_load"] <= 1, "shuffle_buffer": args["shuffle_buffer"] >= 1,
    }
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"invalid {name}: {args[name]!r} (crop_scale's high end at most 1, prefetch and "
                             "shuffle_buffer >= 1, hw_decoder_load in [0, 1])")
