"""Checkpoints: plain data, written atomically, loaded with ``weights_only=True``.

A checkpoint is ``{"format", "config" (dict), "git", "epoch", "step", "encoder_q", "encoder_k",
"optimizer", "scaler", "queue", "rng"}``. ``epoch``/``step`` say where to continue: ``step`` steps
are done in total, of which ``step - epoch * steps_per_epoch`` in ``epoch``.
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy
import torch

from maskco.config import ARCHITECTURE_KEYS

FORMAT = "maskco-checkpoint-v1"
LAST = "checkpoint_last.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or from an incompatible run; the message names the file."""


def atomic_write(path: str, write) -> None:
    """Call ``write(stream)`` on a temporary file in the same folder, fsync, then os.replace: a reader
    sees the old file or the new one, never a half-written one (also when the process dies)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj, path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda stream: torch.save(obj, stream))


def load(path: str) -> dict:
    """Load a checkpoint written by :func:`save_atomic`, with a clear error for every failure."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a MaskCo checkpoint (no format {FORMAT!r})")
    return state


def check_compatible(state: dict, config: dict, path: str) -> None:
    """Refuse a checkpoint whose model differs from this run's config (arch, MPH, head, ...)."""
    stored = state.get("config", {})
    diffs = [f"{k}: checkpoint {stored.get(k)!r} vs run {config.get(k)!r}" for k in ARCHITECTURE_KEYS
             if stored.get(k) != config.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is from a different model configuration ({'; '.join(diffs)}); "
            "use --resume=none or a matching out_dir"
        )


def latest(out_dir: str) -> str | None:
    path = os.path.join(out_dir, LAST)
    return path if os.path.exists(path) else None


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
