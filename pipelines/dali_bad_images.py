"""Which images made a DALI pipeline fail: DALI's error message, else a PIL re-check of the suspects.

DALI stops the iteration on a sample it cannot decode and names the file only for some errors
(broken JPEGs). :func:`named_in_message` reads those names; :func:`check_images` decodes the
candidates (the images of the failing step) with PIL. What to do with them (raise or replace) is the
loader's decision (``pipelines.dali_loader``).
"""
from __future__ import annotations

import io
import re

from PIL import Image

from pipelines.sources import UNREADABLE


def named_in_message(message: str) -> list[tuple[str, str]]:
    """DALI names the sample ("Failed to decode sample #3 : path") when a decoder reports an error."""
    names = re.findall(r"Failed to decode sample #\d+ : (\S+)", message)
    return [(name.strip(), "DALI: cannot decode") for name in names]


def check_images(samples) -> list[tuple[str, str]]:
    """(name, read bytes) pairs -> [(name, reason)] for those PIL cannot decode fully."""
    bad = []
    for name, read in samples:
        try:
            with Image.open(io.BytesIO(read())) as image:
                image.convert("RGB")
        except Image.UnidentifiedImageError:
            bad.append((name, "not an image format PIL knows"))
        except UNREADABLE as error:
            bad.append((name, f"{type(error).__name__}: {error}"))
    return bad
