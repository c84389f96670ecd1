"""The linear-evaluation heads' checkpoint (``out_dir/linear_last.pt``): what the heads evaluate
(:func:`identity`), the default ``out_dir`` (one per backbone and protocol), and the checks before a resume.

A resume must be of the same evaluation: heads trained on another backbone, split or protocol setting would
have their accuracy reported as this one's, so :func:`resume_state` refuses them with one line.
"""
from __future__ import annotations

import argparse
import os

import torch

from maskco import checkpoint

FORMAT = "maskco-linear-v2"  # v1: BatchNorm1d over the flattened features (before OpenSelfSup's BatchNorm2d)
LAST = "linear_last.pt"

# the settings that make two runs' heads different things (the epoch count is not: a rerun may extend it)
PROTOCOL_KEYS = ("protocol", "pooling", "image_size", "lr", "milestones", "momentum", "nesterov", "weight_decay",
                 "batch_size", "color_jitter", "lighting", "backend")


def identity(args: argparse.Namespace) -> dict:
    """What the heads evaluate: the backbone (the checkpoint's SHA-256, with its path and size for the
    reader, or a random init and its seed), the arch, the splits and the protocol settings. Stored with
    the heads and in results.json; a resume must match it (:func:`resume_state`)."""
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise ValueError(f"checkpoint {args.checkpoint} does not exist")
        backbone = {"checkpoint": os.path.abspath(args.checkpoint), "bytes": os.path.getsize(args.checkpoint),
                    "sha256": checkpoint.file_sha256(args.checkpoint)}
    else:
        backbone = {"checkpoint": None, "random_init_seed": args.seed}
    return {**backbone, "arch": args.arch, "train": os.path.abspath(args.train), "val": os.path.abspath(args.val),
            **{key: getattr(args, key) for key in PROTOCOL_KEYS}}


def default_out_dir(args: argparse.Namespace, ident: dict) -> str:
    """One folder per backbone and protocol, so a rerun on another checkpoint never resumes these heads."""
    if ident["checkpoint"]:
        folder = os.path.basename(os.path.dirname(ident["checkpoint"]))
        name = f"{folder}-{os.path.splitext(os.path.basename(ident['checkpoint']))[0]}-{ident['sha256'][:8]}"
    else:
        name = f"random-{args.arch}-seed{args.seed}"
    return os.path.join("runs", "linear", f"{name}-{args.protocol}")


def _differences(stored: dict | None, ident: dict) -> list[str]:
    if stored is None:
        return ["no record of the backbone it evaluated (written by an older version)"]
    return [f"{key}: heads {stored.get(key)!r} vs this run {ident.get(key)!r}" for key in ident
            if key not in ("checkpoint", "bytes") and stored.get(key) != ident.get(key)]


def resume_state(path: str, num_classes: int, shapes: dict[str, list[int]], protocol: str,
                 ident: dict | None = None) -> dict:
    """Load a heads checkpoint and refuse one trained for other classes, stages or feature shapes, or (with
    ``ident``) for another backbone, split or protocol setting: its accuracy would be reported as this one's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign file
        raise ValueError(f"linear checkpoint {path} is unreadable: {error}") from None
    if isinstance(state, dict) and state.get("format") == "maskco-linear-v1":
        raise ValueError(f"linear checkpoint {path} has the old heads (BatchNorm1d over flattened features, "
                         "before OpenSelfSup's per-channel BatchNorm2d); use another --out-dir or --resume none")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a linear-evaluation checkpoint (no format {FORMAT!r})")
    if state["num_classes"] != num_classes:
        raise ValueError(f"linear checkpoint {path} has heads for {state['num_classes']} classes, but the "
                         f"train split has {num_classes}; use another --out-dir or --resume none")
    if state["protocol"] != protocol or state["shapes"] != shapes:
        raise ValueError(f"linear checkpoint {path} is for protocol {state['protocol']} with feature shapes "
                         f"{state['shapes']}, this run is {protocol} with {shapes}; use another --out-dir or "
                         "--resume none")
    differences = _differences(state.get("identity"), ident) if ident is not None else []
    if differences:
        raise ValueError(f"linear checkpoint {path} holds heads of another evaluation ({'; '.join(differences)}); "
                         "resuming would report their accuracy as this backbone's: use --resume none to start "
                         "over, or another --out-dir (the default is one per checkpoint and protocol)")
    return state


def resume_path(resume: str, out_dir: str) -> str | None:
    """``--resume``: auto (``out_dir/linear_last.pt`` if present), none, or a path -> the file to resume from."""
    if resume == "auto":
        last = os.path.join(out_dir, LAST)
        return last if os.path.exists(last) else None
    return None if resume == "none" else resume
