"""Export the pretrained query backbone for transfer, and read it back (DESIGN 4.8).

``python -m maskco.export CHECKPOINT --out-dir DIR`` writes, for a torchvision-shaped backbone (the ImageNet
stem at width 1),

- ``DIR/backbone_torchvision.pth``: the plain torchvision ResNet state dict without ``fc``; it loads with
  ``strict=True`` into ``torchvision.models.<arch>()`` after ``model.fc = nn.Identity()``;
- ``DIR/backbone_detectron2.pkl``: the same weights under detectron2's names, as numpy arrays, for
  ``MODEL.WEIGHTS`` of an R50-C4 (default) or FPN detector; see docs/transfer.md.

Any other backbone (``stem=cifar`` or ``width != 1``) loads into no torchvision model and no detectron2
config: it is written as ``DIR/backbone.pth``, ``{"format", "arch", "stem", "width", "state_dict"}``, which
this project's tools (``evaluate.knn``, ``evaluate.linear``, ``evaluate.region``, ``show``) read back; the
detectron2 export is refused with one line.

The MPH and the projection head are not exported: they exist only for pretraining. The renaming follows
MoCo's converter (https://github.com/facebookresearch/moco/blob/main/detection/convert-pretrain-to-detectron2.py)
with one change: MoCo writes short names (``stem.*``, ``res5.*``) and sets ``matching_heuristics`` so
that detectron2 guesses where each weight goes; we write each weight's full module path in the target
model (``backbone.stem.*``; for C4 ``roi_heads.res5.*``, where that layout keeps res5), so detectron2
loads the file by exact name and a missing or misplaced weight shows up in its log instead of being
matched by suffix.
"""
from __future__ import annotations

from maskco import tool_args

if __name__ == "__main__":  # the flags first, then torch: --help and a bad flag answer at once (tool_args)
    tool_args.run_as_main("maskco.export", tool_args.export_args, (ValueError, OSError))

import argparse
import functools
import json
import os
import pickle
import re
import sys
from collections.abc import Mapping

import torch
from torch import nn

from maskco.atomic_file import atomic_write
from maskco.checkpoint import FORMAT as CHECKPOINT_FORMAT
# torchvision's ResNet family; which one a state dict is follows from its key set and shapes
from maskco.trunk import ARCHS, is_torchvision_shaped, resnet

TORCHVISION_FILE = "backbone_torchvision.pth"
BACKBONE_FILE = "backbone.pth"  # a backbone torchvision cannot hold (small stem, other width), with its shape
BACKBONE_FORMAT = "maskco-backbone-1"
DETECTRON2_FILE = "backbone_detectron2.pkl"
# Where each torchvision stage lives in a detectron2 model. C4: the backbone ends at res4 and res5 is the
# box head (Res5ROIHeads); FPN: the whole ResNet is the bottom-up path of the FPN backbone.
DETECTRON2_LAYOUTS = {
    "c4": {"stem": "backbone.stem", "res2": "backbone.res2", "res3": "backbone.res3",
           "res4": "backbone.res4", "res5": "roi_heads.res5"},
    "fpn": {name: f"backbone.bottom_up.{name}" for name in ("stem", "res2", "res3", "res4", "res5")},
}


# ---- reading: checkpoint or exported dict -> torchvision ResNet

def _shapes(state_dict: Mapping) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def random_backbone(arch: str, stem: str = "imagenet", width: float = 1.0, init: str = "torchvision") -> nn.Module:
    """A randomly initialised ResNet with ``fc = Identity`` (``torchvision.models.<arch>()`` for the defaults):
    the random-init baseline of a run of that shape and init (and the shell the readers below load weights into)."""
    return resnet(arch, stem, width, init=init)


@functools.lru_cache(maxsize=None)
def _reference(arch: str, stem: str = "imagenet", width: float = 1.0) -> dict:
    """The state dict of :func:`random_backbone`, as meta tensors."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return random_backbone(arch, stem, width).state_dict()


def backbone_from_args(args) -> nn.Module:
    """The backbone ``tool_args.add_backbone_arguments``' flags name: a random init of that shape (the stem,
    width and init default to imagenet, 1 and torchvision), or the checkpoint's (its arch checked against
    ``--arch`` if given)."""
    if args.random_init:
        return random_backbone(args.arch, args.stem or "imagenet", args.width or 1.0, args.init or "torchvision")
    return load_backbone(args.checkpoint, args.arch)


def describe(state_dict: Mapping) -> str:
    """A short human description of a ResNet-like state dict (block type and blocks per stage)."""
    if "conv1.weight" not in state_dict:
        sample = ", ".join(list(state_dict)[:4])
        return f"no ResNet stem 'conv1.weight' among its {len(state_dict)} keys ({sample}, ...)"
    block = "Bottleneck" if "layer1.0.conv3.weight" in state_dict else "BasicBlock"
    counts = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for key in state_dict for m in [re.match(rf"layer{stage}\.(\d+)\.", key)] if m}
        counts.append(len(found))
    width = tuple(state_dict["layer1.0.conv1.weight"].shape) if "layer1.0.conv1.weight" in state_dict else None
    return f"{block} blocks per stage {counts}, layer1.0.conv1 {width}"


def infer_arch(state_dict: Mapping) -> str:
    """The torchvision arch whose state dict (fc removed) has exactly these keys and shapes."""
    shapes = _shapes(state_dict)
    for arch in ARCHS:
        if _shapes(_reference(arch)) == shapes:
            return arch
    raise ValueError(f"state dict matches no torchvision ResNet ({', '.join(ARCHS)}): found {describe(state_dict)}")


def _strip_prefix(state_dict: Mapping, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def backbone_weights(state: Mapping, path: str = "<state dict>") -> tuple[dict, dict]:
    """(backbone state dict without fc, its shape ``{"arch", "stem", "width"}``, each None where unknown)
    from any accepted input.

    Accepted: a pretraining checkpoint (``encoder_q`` entries under ``backbone.``; the shape from its
    config), a ``backbone.pth`` of this project (:data:`BACKBONE_FORMAT`), an Encoder state dict (its
    ``backbone.*`` entries; MPH and head ignored), or a plain torchvision ResNet state dict (an ``fc.*``
    classifier, as in torchvision's own weights, is dropped).
    """
    unknown = {"arch": None, "stem": None, "width": None}
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a MaskCo checkpoint or a ResNet state dict, found a {type(state).__name__}")
    if state.get("format") == BACKBONE_FORMAT:
        if not isinstance(state.get("state_dict"), Mapping):
            raise ValueError(f"{path}: backbone file without a 'state_dict'")
        return dict(state["state_dict"]), {key: state.get(key) for key in unknown}
    if "encoder_q" in state or state.get("format") == CHECKPOINT_FORMAT:
        if not isinstance(state.get("encoder_q"), Mapping):
            raise ValueError(f"{path}: MaskCo checkpoint without an 'encoder_q' state dict")
        weights = _strip_prefix(state["encoder_q"], "backbone.")
        if not weights:
            raise ValueError(f"{path}: checkpoint 'encoder_q' has no 'backbone.*' entries")
        config = state.get("config") if isinstance(state.get("config"), Mapping) else {}
        # a checkpoint older than the stem and width keys had the torchvision shape
        return weights, {"arch": config.get("arch"), "stem": config.get("stem", "imagenet"),
                         "width": config.get("width", 1.0)}
    if "backbone.conv1.weight" in state:
        state = _strip_prefix(state, "backbone.")
    weights = {key: value for key, value in state.items() if not str(key).startswith("fc.")}
    if not weights or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise ValueError(f"{path}: expected a MaskCo checkpoint or a state dict of tensors; found keys "
                         f"{', '.join(map(str, list(state)[:6]))}")
    return weights, unknown


def build_backbone(weights: Mapping, arch: str | None = None, path: str = "<state dict>", stem: str = "imagenet",
                   width: float = 1.0) -> nn.Module:
    """A ResNet of this shape (``fc = nn.Identity()``) holding ``weights``; shapes checked first. ``arch`` is
    inferred from the keys and shapes when None (torchvision shapes only)."""
    arch = arch or infer_arch(weights)
    if arch not in ARCHS:
        raise ValueError(f"{path}: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    expected = _reference(arch, stem, width)
    if _shapes(weights) != _shapes(expected):
        try:
            found = f"{infer_arch(weights)} weights"
        except ValueError:
            found = describe(weights)
        shape = "" if is_torchvision_shaped(stem, width) else f" with stem={stem}, width={width}"
        raise ValueError(f"{path}: expected {arch}{shape} weights ({describe(expected)}), found {found}")
    model = random_backbone(arch, stem, width)
    model.load_state_dict(weights, strict=True)
    return model


def load_backbone(path: str, arch: str | None = None) -> nn.Module:
    """Read a pretraining checkpoint, a ``backbone.pth`` or an exported torchvision dict into a ResNet (fc = Identity).

    ``arch`` is checked against what the file records; for a plain dict it is inferred from the key shapes
    when not given. A file of another architecture or not a backbone at all raises ``ValueError`` naming
    ``path`` and what was expected and found.
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated / foreign files
        # torch's own message is paragraphs of advice; keep the line that names a disallowed type, if any
        reason = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line),
                      type(error).__name__)
        raise ValueError(f"{path} is not a readable torch file (truncated, or not a checkpoint): {reason}") from None
    weights, shape = backbone_weights(state, path)
    if arch and shape["arch"] and arch != shape["arch"]:
        raise ValueError(f"{path}: expected arch {arch}, but the checkpoint was pretrained with {shape['arch']}")
    return build_backbone(weights, arch or shape["arch"], path, shape["stem"] or "imagenet",
                          1.0 if shape["width"] is None else float(shape["width"]))


# ---- writing

def _checked_weights(state_dict: Mapping) -> dict:
    weights, _ = backbone_weights(state_dict)
    infer_arch(weights)  # refuse anything that is not a whole torchvision ResNet
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in weights.items()}


def export_torchvision(state_dict: Mapping, path: str) -> None:
    """Write the backbone as a torchvision ResNet state dict without fc (plain tensors, weights_only-safe).

    ``state_dict``: torchvision names (``conv1.weight``, ``layer1.0...``), or an Encoder's with the
    ``backbone.`` prefix; ``fc.*`` is dropped.
    """
    weights = _checked_weights(state_dict)
    atomic_write(path, lambda stream: torch.save(weights, stream))


def export_backbone(state_dict: Mapping, out_dir: str, arch: str, stem: str = "imagenet",
                    width: float = 1.0) -> str:
    """Write the backbone where its readers find it -> the file: ``backbone_torchvision.pth`` when
    torchvision can hold it, else ``backbone.pth`` with its shape (see the module docstring)."""
    if is_torchvision_shaped(stem, width):
        path = os.path.join(out_dir, TORCHVISION_FILE)
        export_torchvision(state_dict, path)
        return path
    weights, _ = backbone_weights(state_dict)
    build_backbone(weights, arch, BACKBONE_FILE, stem, width)  # refuse a partial or foreign state dict
    payload = {"format": BACKBONE_FORMAT, "arch": arch, "stem": stem, "width": float(width),
               "state_dict": {key: value.detach().to("cpu").contiguous().clone() for key, value in weights.items()}}
    path = os.path.join(out_dir, BACKBONE_FILE)
    atomic_write(path, lambda stream: torch.save(payload, stream))
    return path


def detectron2_name(key: str, layout: str = "c4") -> str:
    """torchvision backbone key -> full detectron2 parameter name (MoCo's renaming + module path)."""
    stage, _, rest = key.partition(".")
    if stage.startswith("layer"):
        stage, rest = f"res{int(stage[5:]) + 1}", rest  # layer1 -> res2 ... layer4 -> res5
    else:
        stage, rest = "stem", key  # conv1, bn1 -> stem.conv1, stem.conv1.norm
    rest = re.sub(r"\bbn(\d)\b", r"conv\1.norm", rest)  # bnK -> convK.norm
    rest = rest.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return f"{DETECTRON2_LAYOUTS[layout][stage]}.{rest}"


def export_detectron2(state_dict: Mapping, path: str, layout: str = "c4") -> None:
    """Write the backbone as a detectron2 weights file: pickle of ``{"model": {name: numpy}, ...}``.

    ``layout``: ``c4`` (R50-C4: res5 inside ``roi_heads``) or ``fpn`` (``backbone.bottom_up``). BatchNorm's
    ``num_batches_tracked`` is left out: it has no meaning for transfer, detectron2's FrozenBatchNorm has
    no such buffer, and torch's BatchNorm fills it in when missing from a plain dict.
    """
    if layout not in DETECTRON2_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(DETECTRON2_LAYOUTS)}, got {layout!r}")
    weights = _checked_weights(state_dict)
    model = {detectron2_name(key, layout): value.numpy() for key, value in weights.items()
             if not key.endswith("num_batches_tracked")}
    payload = {"model": model, "__author__": "maskco", "matching_heuristics": False}
    atomic_write(path, lambda stream: pickle.dump(payload, stream, protocol=pickle.HIGHEST_PROTOCOL))


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (``tool_args.export_args``) and :func:`run`: the export's record."""
    return run(tool_args.export_args(argv))


def run(args: argparse.Namespace) -> dict:
    """Export the checkpoint ``args`` name into ``args.out_dir``; prints the record of what was written."""
    backbone = load_backbone(args.checkpoint, args.arch)  # validates arch and shapes once, for both outputs
    weights = backbone.state_dict()
    shape = _shape_of(backbone)
    if not is_torchvision_shaped(shape["stem"], shape["width"]):
        written = export_backbone(weights, args.out_dir, **shape)
        print(f"maskco.export: detectron2 and torchvision need the ImageNet stem at width 1 (this backbone: "
              f"stem={shape['stem']}, width={shape['width']}); wrote {written} for this project's tools",
              file=sys.stderr)
        record = {"checkpoint": args.checkpoint, **shape, "backbone": written}
        print(json.dumps(record))
        return record
    written = {"torchvision": os.path.join(args.out_dir, TORCHVISION_FILE),
               "detectron2": os.path.join(args.out_dir, DETECTRON2_FILE)}
    export_torchvision(weights, written["torchvision"])
    export_detectron2(weights, written["detectron2"], args.detectron2_layout)
    record = {"checkpoint": args.checkpoint, "arch": infer_arch(weights), **written,
              "detectron2_layout": args.detectron2_layout}
    print(json.dumps(record))
    return record


def _shape_of(backbone: nn.Module) -> dict:
    """``{"arch", "stem", "width"}`` of a backbone built by :func:`random_backbone`."""
    stem = "cifar" if backbone.conv1.stride == (1, 1) else "imagenet"
    width = backbone.conv1.out_channels / 64
    arch = next(a for a in ARCHS if _shapes(_reference(a, stem, width)) == _shapes(backbone.state_dict()))
    return {"arch": arch, "stem": stem, "width": width}

