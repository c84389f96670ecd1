"""Shared fixtures: a small generated sample ImageFolder, and writers of broken or unusual images."""
from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pipelines.sample_data import make_sample_data

# Files with an image extension that cannot be decoded (a loader must skip or reject them) ...
BAD_KINDS = ("corrupt_jpeg", "truncated_jpeg", "not_an_image", "zero_byte")
# ... and images in modes other than 8-bit RGB (a loader must convert them to RGB).
ODD_KINDS = ("cmyk_jpeg", "grayscale_jpeg", "rgba_png", "palette_png")
SUFFIX = {"rgba_png": ".png", "palette_png": ".png"}  # everything else is written as .jpg


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> str:
    """A sample ImageFolder: 24 JPEGs (about 200 x 150, some portrait), 3 classes of 8; read-only."""
    return make_sample_data(str(tmp_path_factory.mktemp("sample") / "data"), num_images=24,
                            num_classes=3, seed=0, size=(200, 150))


@pytest.fixture
def sample_copy(sample_root, tmp_path) -> str:
    """A private copy of ``sample_root`` that a test may add broken files to."""
    return shutil.copytree(sample_root, str(tmp_path / "data"))


@pytest.fixture(name="write_odd_image")
def write_odd_image_fixture():
    """The :func:`write_odd_image` function, for tests that take fixtures only."""
    return write_odd_image


def write_odd_image(kind: str, folder: str, name: str | None = None, size=(160, 120)) -> str:
    """Write one image of ``kind`` (BAD_KINDS or ODD_KINDS) into ``folder``; return its path.

    The file name is ``name`` or ``<kind>.jpg`` / ``<kind>.png``; size is (width, height).
    """
    path = os.path.join(folder, name or kind + SUFFIX.get(kind, ".jpg"))
    os.makedirs(folder, exist_ok=True)
    rgb = _gradient(size)
    if kind == "corrupt_jpeg":
        data = _corrupt_quantisation_table(_jpeg_bytes(rgb))
    elif kind == "truncated_jpeg":
        data = _jpeg_bytes(rgb)
        data = data[: len(data) // 2]
    elif kind == "not_an_image":
        data = b"this is a text file with an image extension\n" * 20
    elif kind == "zero_byte":
        data = b""
    elif kind == "cmyk_jpeg":
        data = _encode(rgb.convert("CMYK"), "JPEG", quality=95)
    elif kind == "grayscale_jpeg":
        data = _encode(rgb.convert("L"), "JPEG", quality=95)
    elif kind == "rgba_png":
        rgba = rgb.copy()
        rgba.putalpha(Image.linear_gradient("L").resize(size))
        data = _encode(rgba, "PNG")
    elif kind == "palette_png":
        palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        data = _encode(palette, "PNG", transparency=0)
    else:
        raise ValueError(f"kind must be one of {BAD_KINDS + ODD_KINDS}, got {kind!r}")
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def _gradient(size) -> Image.Image:
    width, height = size
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)  # [H, W]
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)  # [H, W]
    rgb = np.stack([x, y, 255 - (x + y) / 2], axis=-1).astype(np.uint8)  # [H, W, 3]
    return Image.fromarray(rgb, "RGB")


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def _jpeg_bytes(image: Image.Image) -> bytes:
    return _encode(image, "JPEG", quality=90)


def _corrupt_quantisation_table(data: bytes) -> bytes:
    """A JPEG whose header still identifies it (Image.open succeeds) but whose decode fails: the
    first quantisation table (DQT, marker FFDB) claims a length of 2, which breaks the stream."""
    at = data.find(b"\xff\xdb")
    assert at > 0, "no DQT segment in the JPEG"
    return data[: at + 2] + b"\x00\x02" + data[at + 4 :]


def pytest_configure(config):
    # torchvision 0.29 deprecates its image codecs (moving to torchcodec); we still use them on purpose
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities:DeprecationWarning")
