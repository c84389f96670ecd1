"""Files written whole or not at all (DESIGN 2.3): a temporary file in the same folder, fsync, then
``os.replace``, so a reader sees the old file or the new one, also when the writer is killed mid-write.

:func:`atomic_write` returns the SHA-256 and size of what it wrote. Files get the permissions of the process
umask (like any file the user creates), not ``tempfile``'s private 0600. A full disk is a
:class:`CheckpointError` naming the path, the space needed and the space free. Checkpoints and their manifest
(``maskco.checkpoint``) and exported backbones (``maskco.export``) are written through it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from typing import Callable

TMP_PREFIX = ".tmp-"  # a temporary file's name starts with it: a run removes those a killed writer left


# here, below maskco.checkpoint, because a full disk while writing is one too
class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or from an incompatible run; the message names the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once at import: os.umask can only be read by setting it


class _HashingWriter:
    """A binary stream that hashes and counts what passes through it (torch.save writes into it)."""

    def __init__(self, stream):
        self.stream, self.hash, self.size = stream, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += memoryview(data).nbytes  # pickle protocol 5 hands over PickleBuffers, which have no len()
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def atomic_write(path: str, write: Callable, expected_bytes: int = 0) -> tuple[str, int]:
    """Call ``write(stream)`` on a temporary file in the same folder, fsync, then os.replace: a reader
    sees the old file or the new one, never a half-written one (also when the process dies).

    Returns (sha256 hex digest, size) of what was written. A full disk is a :class:`CheckpointError`
    naming the path, the space needed (``expected_bytes`` when the writer died early) and the space free.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
    try:
        with os.fdopen(handle, "wb") as raw:
            stream = _HashingWriter(raw)
            write(stream)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
        return stream.hash.hexdigest(), stream.size
    except BaseException as error:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, Exception) and _out_of_space(error, folder, max(expected_bytes, written)):
            free = shutil.disk_usage(folder).free
            raise CheckpointError(
                f"no space left on the device to write {path}: it needs about {_mib(max(expected_bytes, written))} "
                f"and {_mib(free)} is free in {folder}; the previous checkpoint is kept") from None
        raise


def _out_of_space(error: BaseException, folder: str, needed: int) -> bool:
    """ENOSPC anywhere in the chain, or torch's zip writer failing with less room left than the file needs."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and ("file write failed" in str(error) or "unexpected pos" in str(error)):
            return shutil.disk_usage(folder).free < max(needed, 1 << 20)
        error = error.__cause__ or error.__context__
    return False


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
