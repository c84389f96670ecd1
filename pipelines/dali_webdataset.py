"""Webdataset shards for the DALI loader (``pipelines.dali_loader``): finding, indexing and reading them.

A webdataset ``source`` is one ``.tar``, a folder of ``.tar`` files, or a pattern such as
``shards/train-{0000..0099}.tar`` or ``shards/*.tar`` (:func:`tar_shards`). ``readers.webdataset``
reads images (extensions in ``WDS_IMAGE_EXT``, case-insensitive) and, if the first shard has ``.cls``
members, integer labels; samples missing a component are skipped. Index files (``<name>.idx`` beside
each tar, from DALI's ``wds2idx`` tool) are used when every shard has one; otherwise
:func:`count_shards` writes them once to a temporary folder at start-up (each rank scans every tar:
index big sets beforehand). How the loader orders, shards and resumes the sample stream is in its own
docstring.
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
from typing import Optional

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def

from pipelines.sources import DataError

WDS_IMAGE_EXT = "jpg;jpeg;png;webp;bmp;ppm;pgm;pnm;tif;tiff"
_READER = "reader"  # the reader's name in this module's own pipelines (counting, re-reading)


def tar_shards(source: str) -> Optional[list[str]]:
    """The tar files of a webdataset ``source`` (a .tar, a folder of them, a brace / glob pattern), or
    None if ``source`` is not one. Raises DataError for a missing path or an empty match."""
    source = os.path.expanduser(source)
    if any(c in source for c in "{*?["):
        patterns = _expand_braces(source)
        missing = [p for p in patterns if not any(c in p for c in "*?[") and not os.path.isfile(p)]
        if missing:
            raise DataError(f"webdataset shard {missing[0]} of {source} does not exist")
        paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
        if not paths:
            raise DataError(f"webdataset pattern {source} matches no files")
    elif source.endswith(".tar"):
        if not os.path.isfile(source):
            raise DataError(f"data source {source} does not exist")
        paths = [source]
    elif os.path.isdir(source):
        names = sorted(os.listdir(source))
        if not any(n.endswith(".tar") for n in names) or any(os.path.isdir(os.path.join(source, n))
                                                             for n in names):
            return None  # an image folder
        paths = [os.path.join(source, n) for n in names if n.endswith(".tar")]
    else:
        return None
    not_tar = [p for p in paths if not p.endswith(".tar")]
    if not_tar:
        raise DataError(f"webdataset source {source} includes {not_tar[0]}, which is not a .tar file")
    return paths


def _expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` -> a00bx, a00by, ..., a02by (webdataset's shard notation, zero-padded)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        items = [str(i).zfill(len(span.group(1))) for i in range(int(span.group(1)), int(span.group(2)) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for item in items for out in _expand_braces(head + item + tail)]


def count_shards(tars: list[str], index_dir: str) -> tuple[int, bool, list[str]]:
    """-> (samples with an image (and a label where labelled), labelled, index file of each tar)."""
    try:
        with tarfile.open(tars[0]) as first:
            labelled = any(member.name.endswith(".cls") for _, member in zip(range(64), first))
    except (OSError, tarfile.TarError) as error:
        raise DataError(f"cannot read webdataset shard {tars[0]}: {error}") from error
    index_paths = [tar[: -len(".tar")] + ".idx" for tar in tars]
    if not all(os.path.isfile(p) for p in index_paths):
        # Index once here: without index files DALI re-scans every tar per pipeline, i.e. each epoch.
        from wds2idx import IndexCreator  # ships with DALI

        index_paths = [os.path.join(index_dir, f"{i:06d}.idx") for i in range(len(tars))]
        for tar, index_path in zip(tars, index_paths):
            with IndexCreator(tar, index_path, verbose=False) as creator:
                creator.create_index()

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def count():
        return tuple(read_shards(paths=tars, index_paths=index_paths, name=_READER,
                                 ext=[WDS_IMAGE_EXT] + (["cls"] if labelled else []),
                                 case_sensitive_extensions=False, missing_component_behavior="skip"))

    pipe = count()
    try:
        pipe.build()
    except RuntimeError as error:
        raise DataError(f"cannot index webdataset shards {tars[0]} ...: {error}") from error
    size = pipe.epoch_size(_READER)
    del pipe
    return size, labelled, index_paths


def read_shards(**reader_args) -> list:
    """``fn.readers.webdataset(**reader_args)`` as a list: [encoded, label] or [encoded]."""
    outputs = fn.readers.webdataset(**reader_args)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]  # one ext: one DataNode


def shard_samples(reader_args: dict, batch_size: int, steps: slice) -> list:
    """(source_info, read bytes) of the samples ``steps`` of the webdataset stream of ``reader_args``."""
    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def raw():
        encoded = read_shards(name=_READER, **reader_args)[0]
        return encoded, fn.get_property(encoded, key="source_info")

    pipe, samples, position = raw(), [], 0
    pipe.build()
    while position < steps.stop:
        encoded, info = pipe.run()
        for i in range(len(encoded)):
            if steps.start <= position < steps.stop:  # keep only the window: the stream may be long
                data = np.array(encoded[i]).tobytes()
                samples.append((np.array(info[i]).tobytes().decode(), lambda data=data: data))
            position += 1
    return samples


def parse_labels(cls_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, L] zero-padded ``.cls`` texts -> int64 [N] (-1 where empty)."""
    labels = []
    for row in cls_bytes.numpy():
        text = row.tobytes().rstrip(b"\0").strip()
        try:
            labels.append(int(text) if text else -1)
        except ValueError:
            raise DataError(f"webdataset label {text[:20]!r} is not an integer") from None
    return torch.tensor(labels, dtype=torch.int64)
