"""Reading an FFCV ``.beton`` file back, for the loader and the tests: :func:`check_beton` validates a
file before FFCV's reader touches it, :func:`read_image` decodes one stored image like the loader does.

:mod:`pipelines.ffcv_writer` writes the format (and verifies each file it writes with :func:`check_beton`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipelines.sources import DataError


@dataclass(frozen=True)
class BetonInfo:
    path: str
    num_samples: int
    field_names: list
    image_field: str
    label_field: Optional[str]  # the IntField named "label", else the first IntField, else None
    images: np.ndarray  # [num_samples] FFCV image metadata: mode (0 jpg, 1 raw), width, height, data_ptr
    sizes: np.ndarray  # [num_samples] bytes stored for each image
    labels: Optional[np.ndarray]  # int64 [num_samples] of label_field, None without one


def check_beton(path: str) -> BetonInfo:
    """Validate the ``.beton`` file ``path`` (header, field table, metadata, allocation table) and
    describe it; a missing, truncated or foreign file is a :class:`DataError`, before FFCV's reader
    (or its compiled code, which does not check bounds) reads it."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType,
                            HeaderType, get_metadata_type)

    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise DataError(f"FFCV dataset {path} does not exist")
    if os.path.isdir(path):
        raise DataError(f"FFCV dataset {path} is a folder; the ffcv backend reads a .beton file "
                        "(convert it: `make ffcv DATA=root OUT=out_dir` for a root holding train/ and val/, or "
                        "`.venv/bin/python -m pipelines.ffcv_writer folder out.beton` for one folder)")
    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        raise _not_beton(path, f"{size} bytes, shorter than its header (truncated?)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise _not_beton(path, f"format version {int(header['version'])}, expected {CURRENT_VERSION} "
                         "(not a .beton file?)")
    num_fields, num_samples = int(header["num_fields"]), int(header["num_samples"])
    table_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if not 0 < num_fields <= 64 or table_end > size:
        raise _not_beton(path, f"{num_fields} fields in a {size}-byte file (truncated or corrupt)")
    descriptors = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    if any(TYPE_ID_HANDLER.get(int(t)) is None for t in descriptors["type_id"]):
        raise _not_beton(path, f"unknown field types {descriptors['type_id'].tolist()}")
    names = [bytes(d["name"]).split(b"\0")[0].decode("ascii", "replace") for d in descriptors]
    handlers = [TYPE_ID_HANDLER[int(d["type_id"])].from_binary(d["arguments"]) for d in descriptors]
    image_fields = [n for n, h in zip(names, handlers) if isinstance(h, RGBImageField)]
    int_fields = [n for n, h in zip(names, handlers) if isinstance(h, IntField)]
    if not image_fields:
        raise _not_beton(path, f"no RGBImageField among its fields {names}")
    metadata_type = get_metadata_type(handlers)
    metadata_end = table_end + num_samples * metadata_type.itemsize
    alloc_ptr = int(header["alloc_table_ptr"])
    table_bytes = size - alloc_ptr
    if num_samples < 1 or not metadata_end <= alloc_ptr <= size or table_bytes % ALLOC_TABLE_TYPE.itemsize:
        raise _not_beton(path, f"{num_samples} samples, allocation table at byte {alloc_ptr} of {size} "
                         "(truncated or corrupt)")

    metadata = np.fromfile(path, dtype=metadata_type, count=num_samples, offset=table_end)
    images = metadata[f"f{names.index(image_fields[0])}"]
    sizes = _stored_sizes(path, images, np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=alloc_ptr), alloc_ptr)
    label = "label" if "label" in int_fields else (int_fields[0] if int_fields else None)
    labels = None if label is None else metadata[f"f{names.index(label)}"].astype(np.int64)
    return BetonInfo(path, num_samples, names, image_fields[0], label, images, sizes, labels)


def _stored_sizes(path: str, images: np.ndarray, alloc: np.ndarray, alloc_ptr: int) -> np.ndarray:
    """Check that every image record points at an allocation below the table at ``alloc_ptr`` and is
    well-formed -> bytes stored for each image, in sample order."""
    order = np.argsort(alloc["ptr"])
    ptrs, sizes = alloc["ptr"][order], alloc["size"][order]
    slot = np.minimum(np.searchsorted(ptrs, images["data_ptr"]), max(len(ptrs) - 1, 0))
    if len(ptrs) == 0 or (ptrs[slot] != images["data_ptr"]).any() or (ptrs + sizes > alloc_ptr).any():
        raise _not_beton(path, "image data outside its allocation table (truncated or corrupt)")
    raw_bytes = 3 * images["width"].astype(np.uint64) * images["height"].astype(np.uint64)
    if ((images["width"] == 0) | (images["height"] == 0) | (images["mode"] > 1)).any() or \
            (sizes[slot][images["mode"] == 1] < raw_bytes[images["mode"] == 1]).any():
        raise _not_beton(path, "corrupt image metadata (size 0, unknown mode or raw data too short)")
    return sizes[slot]


def _not_beton(path: str, why: str) -> DataError:
    return DataError(f"{path} is not a readable FFCV .beton file: {why}")


def read_image(path: str, index: int) -> np.ndarray:
    """Decode stored image ``index`` of ``path`` exactly as the FFCV loader does -> uint8 [H, W, 3]."""
    from ffcv.libffcv import imdecode

    info = check_beton(path)
    if not 0 <= index < info.num_samples:
        raise ValueError(f"index must be in 0..{info.num_samples - 1}, got {index}")
    meta = info.images[index]
    height, width = int(meta["height"]), int(meta["width"])
    data = np.memmap(info.path, dtype=np.uint8, mode="r")
    blob = data[int(meta["data_ptr"]): int(meta["data_ptr"]) + int(info.sizes[index])]
    if meta["mode"] == 1:  # raw
        return np.array(blob[: 3 * height * width]).reshape(height, width, 3)
    image = np.empty((height, width, 3), dtype=np.uint8)
    blob = np.ascontiguousarray(blob)
    if imdecode(blob, image, height, width, height, width, 0, 0, 1, 1, False, False) != 0:
        raise DataError(f"{path}: stored image {index} is not a decodable JPEG")
    return image
