"""Checkpoints: plain data, written atomically, verified on load, the last few kept.

A checkpoint is ``{"format", "config" (dict), "git", "epoch", "step", "encoder_q", "encoder_k",
"optimizer", "scaler", "queue", "rng", "data", "batch_size", "world_size", "skipped_images"}``.
``epoch``/``step`` say where to continue: ``step`` steps are done in total, of which
``step - epoch * steps_per_epoch`` in ``epoch``.

In a run's ``out_dir`` (:class:`Store`):

- ``checkpoint_step00000120.pt``: one file per save, written to ``.tmp-*`` then renamed
  (``maskco.atomic_file``), so a reader sees a whole file or none (also when the process is killed mid-write);
- ``checkpoint_last.pt``: the newest of them (a hard link: no extra space), the name other tools take;
- ``checkpoints.json``: the kept files, newest first, with their size and SHA-256. Resuming verifies
  the newest against it and falls back to the previous one, with a warning, if it is damaged.

Only the last ``keep`` good files stay: a file that fails verification (resuming, or before an older
file is counted as kept) is moved aside as ``<name>.damaged``, named in one warning, and never counted,
so a damaged file never costs a good one. Temporary files left by a killed writer are removed when a run
starts. Files get the permissions of the process umask (like any file the user creates), not
``tempfile``'s private 0600; a full disk is a :class:`CheckpointError` naming the space needed and free.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Callable, Optional

import numpy
import torch

from maskco.atomic_file import TMP_PREFIX, CheckpointError, atomic_write
from maskco.config import ARCHITECTURE_KEYS, Config

FORMAT = "maskco-checkpoint-v1"
LAST = "checkpoint_last.pt"
MANIFEST = "checkpoints.json"
STEP_FILE = re.compile(r"^checkpoint_step(\d+)\.pt$")
DAMAGED = ".damaged"  # suffix of a file that failed verification, moved aside


def state_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) state: about the size its file will have."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def save_atomic(obj, path: str) -> tuple[str, int]:
    """torch.save ``obj`` to ``path`` atomically (see :func:`atomic_write`) -> (sha256, size)."""
    return atomic_write(path, lambda stream: torch.save(obj, stream), state_bytes(obj))


def load(path: str, sha256: Optional[str] = None, verify: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_atomic`, with a clear error for every failure.

    ``sha256``: the expected content hash (from the manifest); None looks it up in the manifest beside
    the file, if there is one that lists it. ``verify=False``: no hash check (a file already verified).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    expected = (sha256 or _manifest_hash(path)) if verify else None
    if expected is not None and file_sha256(path) != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the SHA-256 recorded "
                              f"in {MANIFEST} when it was written (truncated or overwritten)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a MaskCo checkpoint (no format {FORMAT!r})")
    return state


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(folder: str) -> list[dict]:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as handle:
            entries = json.load(handle)["checkpoints"]
        return [e for e in entries if isinstance(e, dict) and {"file", "sha256", "step"} <= e.keys()]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _manifest_hash(path: str) -> Optional[str]:
    folder, name = os.path.split(os.path.abspath(path))
    entries = _read_manifest(folder)
    if name == LAST and entries and os.path.exists(os.path.join(folder, entries[0]["file"])) and \
            os.path.samefile(path, os.path.join(folder, entries[0]["file"])):
        return entries[0]["sha256"]
    return next((e["sha256"] for e in entries if e["file"] == name), None)


class Store:
    """The checkpoints of one run in ``folder``: save (keeping the last ``keep`` good ones), find the newest
    good one. ``warn(message)`` hears of every damaged file moved aside.

    Only one process (rank 0) saves; every rank may read.
    """

    def __init__(self, folder: str, keep: int = 2, warn: Optional[Callable[[str], None]] = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder, self.keep = folder, keep
        self.warn = warn or (lambda message: None)
        self._good: set[tuple[str, int, int]] = set()  # (name, size, mtime) of files verified by this process

    @property
    def last(self) -> str:
        return os.path.join(self.folder, LAST)

    def remove_stale(self) -> list[str]:
        """Delete temporary files left by a writer that was killed (call before the first save)."""
        if not os.path.isdir(self.folder):
            return []
        stale = [os.path.join(self.folder, n) for n in os.listdir(self.folder) if n.startswith(TMP_PREFIX)]
        for path in stale:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return stale

    def save(self, state: dict, step: int) -> str:
        """Write ``state`` as the newest checkpoint; keep it and the ``keep - 1`` newest older files that
        verify (a damaged one is moved aside, not counted); delete the rest. -> its path."""
        name = f"checkpoint_step{step:08d}.pt"
        path = os.path.join(self.folder, name)
        sha256, size = save_atomic(state, path)
        self._link_last(path)
        self._remember(name)
        kept = [{"file": name, "step": step, "sha256": sha256, "bytes": size}]
        for entry in _read_manifest(self.folder):
            if len(kept) == self.keep:
                break
            if entry["file"] != name and self._verifies(entry):
                kept.append(entry)
        self._write_manifest(kept)
        names = {e["file"] for e in kept}
        for other in os.listdir(self.folder):
            if STEP_FILE.match(other) and other not in names:
                os.unlink(os.path.join(self.folder, other))
        return path

    def _verifies(self, entry: dict) -> bool:
        """Whether a manifest entry's file is whole (its SHA-256, read once per process); a damaged one
        is moved aside."""
        path = os.path.join(self.folder, entry["file"])
        if not os.path.exists(path):
            return False
        if self._key(entry["file"]) in self._good:
            return True
        if file_sha256(path) == entry["sha256"]:
            self._remember(entry["file"])
            return True
        self._move_aside(path, f"checkpoint {path} is damaged: its content does not match the SHA-256 "
                               f"recorded in {MANIFEST} when it was written")
        return False

    def _move_aside(self, path: str, reason: str, warn: Optional[Callable[[str], None]] = None) -> None:
        warn = warn or self.warn
        try:
            os.replace(path, path + DAMAGED)
            warn(f"{reason}; moved aside to {path + DAMAGED} (never counted as a kept checkpoint)")
        except OSError as error:
            warn(f"{reason}; could not move it aside ({error})")

    def _key(self, name: str) -> tuple[str, int, int]:
        info = os.stat(os.path.join(self.folder, name))
        return name, info.st_size, info.st_mtime_ns

    def _remember(self, name: str) -> None:
        self._good.add(self._key(name))

    def _write_manifest(self, entries: list[dict]) -> None:
        atomic_write(os.path.join(self.folder, MANIFEST),
                     lambda stream: stream.write(json.dumps({"checkpoints": entries}, indent=1).encode()))

    def _link_last(self, path: str) -> None:
        """``checkpoint_last.pt`` -> ``path``, atomically: a hard link where the filesystem has them, else a copy."""
        tmp = os.path.join(self.folder, f"{TMP_PREFIX}last-{os.getpid()}")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.last)

    def candidates(self) -> list[tuple[str, Optional[str]]]:
        """Checkpoint files to resume from, newest first, with their recorded hash (None: not recorded)."""
        recorded = {e["file"]: e["sha256"] for e in _read_manifest(self.folder)}
        found = []
        if os.path.isdir(self.folder):
            found = sorted((int(m.group(1)), m.group(0)) for m in map(STEP_FILE.match, os.listdir(self.folder)) if m)
        paths = [(os.path.join(self.folder, name), recorded.get(name)) for _, name in reversed(found)]
        if not paths and os.path.exists(self.last):  # a run from before step-named files
            paths = [(self.last, None)]
        return paths

    def load_latest(self, warn: Optional[Callable[[str], None]] = None) -> tuple[Optional[str], Optional[dict]]:
        """The newest checkpoint that verifies and loads -> (path, state); (None, None) if there is none.

        Damaged newer files are moved aside (``*.damaged``, one warning each through ``warn``, default the
        store's) and ``checkpoint_last.pt`` is pointed at the file resumed from. If every file is damaged,
        the error of the newest is raised and nothing is moved (starting over silently would lose the run).
        """
        warn = warn or self.warn
        errors = []
        for path, sha256 in self.candidates():
            try:
                state = load(path, sha256) if sha256 else load(path)
            except CheckpointError as error:
                errors.append((path, error))
                continue
            self._set_aside(errors, path, warn)
            return path, state
        if errors:
            raise CheckpointError(f"no usable checkpoint in {self.folder}: {errors[0][1]} "
                                  "(use --resume=none to start over)")
        return None, None

    def _set_aside(self, damaged: list, good: str, warn: Callable[[str], None]) -> None:
        """After resuming from ``good``: move the damaged newer files aside, drop them from the manifest and
        point ``checkpoint_last.pt`` at ``good``, so no later save or tool counts or reads them."""
        if os.path.basename(good) != LAST:
            self._remember(os.path.basename(good))
        if not damaged:
            return
        for path, error in damaged:
            self._move_aside(path, f"{error}; resuming from {good}", warn)
        names = {os.path.basename(path) for path, _ in damaged}
        self._write_manifest([e for e in _read_manifest(self.folder) if e["file"] not in names])
        if os.path.basename(good) != LAST:
            self._link_last(good)


def _default(key: str):
    return Config.__dataclass_fields__[key].default


def check_compatible(state: dict, config: dict, path: str) -> None:
    """Refuse a checkpoint whose model differs from this run's config (arch, MPH, head, ...)."""
    # a key newer than the checkpoint had its default when the checkpoint was written
    stored = {**{k: _default(k) for k in ARCHITECTURE_KEYS}, **state.get("config", {})}
    diffs = [f"{k}: checkpoint {stored.get(k)!r} vs run {config.get(k)!r}" for k in ARCHITECTURE_KEYS
             if stored.get(k) != config.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is from a different model configuration ({'; '.join(diffs)}); "
            "use --resume=none or a matching out_dir"
        )


def latest(out_dir: str) -> str | None:
    """The newest checkpoint file in ``out_dir`` (not verified: see :meth:`Store.load_latest`)."""
    found = Store(out_dir).candidates()
    return found[0][0] if found else None


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = numpy.random.get_state()  # plain types only: weights_only loads
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    numpy.random.set_state((saved["name"], saved["keys"].numpy().astype("uint32"), saved["pos"],
                            saved["has_gauss"], saved["cached"]))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
