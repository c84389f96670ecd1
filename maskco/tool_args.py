"""The command lines of ``maskco.export`` and the evaluations (``evaluate.knn``, ``linear``, ``region``,
``localise``), declared without torch.

Each of these modules is a library that loads torch, and also a tool. Run as a tool, it reads its flags
here first (:func:`run_as_main`), so ``--help`` and a bad flag answer at once (DESIGN 7.1), and only then
imports itself as a library and runs: ``run(args)``. Its ``main(argv)`` (for callers in Python: quality,
tests) is ``run(<tool>_args(argv))``.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import math
import sys
from typing import Callable, NoReturn

from maskco import cli, vocab

DEFAULT_IMAGES = 512  # localise: images measured
LOCALISE_SUMMARY = """Localisation accuracy: the share of masked boxes whose similarity peak in the key view falls in
their positive box. The model, views and boxes are the checkpoint's; presets and --key=value overrides
(e.g. --data, --backend) apply on top, but none may change the model. --random-init measures an untrained
network of the checkpoint's (or the presets') shape."""
LOCALISE_OWN = ("  --checkpoint PATH  a pretraining checkpoint (checkpoint_*.pt)\n"
                "  --random-init      an untrained network of the config's shape instead (as both encoders)\n"
                f"  --images N         images to measure (default {DEFAULT_IMAGES})\n"
                "  --out PATH         also write the result as JSON")
DETECTRON2_LAYOUT_NAMES = ("c4", "fpn")  # export.DETECTRON2_LAYOUTS' keys (a test checks)


def run_as_main(module: str, parse: Callable, known: tuple[type[BaseException], ...] = (ValueError,)) -> NoReturn:
    """``python -m <module>``: parse ``sys.argv`` with ``parse`` (no torch yet), import ``module`` and call its
    ``run(args)``; exit 0, or 2 with one line for a ``known`` error (a bad input)."""
    try:
        args = parse(None)
        importlib.import_module(module).run(args)
    except known as error:
        sys.exit(cli.fail(module, error))
    sys.exit(0)


def summary(module: str) -> str:
    """The first paragraph of ``module``'s docstring, read from its source without importing it (the
    import would load torch): the tool's ``--help`` description."""
    with open(importlib.util.find_spec(module).origin, encoding="utf-8") as handle:
        return (ast.get_docstring(ast.parse(handle.read())) or "").split("\n\n")[0]


def _parser(module: str) -> cli.ArgumentParser:
    return cli.ArgumentParser(prog=f"python -m {module}", description=summary(module))


# ---- the backbone a tool reads: a checkpoint or a random init of a given shape

def add_shape_arguments(parser) -> None:
    """``--arch``, ``--stem``, ``--width`` and ``--init`` of a tool that builds or checks a backbone."""
    parser.add_argument("--arch", choices=vocab.ARCHS,
                        help="backbone arch (default: from the checkpoint or its key shapes)")
    parser.add_argument("--stem", choices=vocab.STEMS, default=None,
                        help="with --random-init: the stem (default imagenet); a checkpoint records its own")
    parser.add_argument("--width", type=float, default=None,
                        help="with --random-init: the channel multiplier (default 1); a checkpoint records its own")
    parser.add_argument("--init", choices=vocab.INITS, default=None,
                        help="with --random-init: the convs' initialisation (default torchvision), as the run's "
                             "init key")


def add_backbone_arguments(parser, random_init_help: str = "a randomly initialised --arch (baseline)") -> None:
    """``--checkpoint`` or ``--random-init`` (one of them required), then the shape arguments: the backbone an
    evaluation tool measures. After parsing, :func:`check_backbone_arguments`; then ``export.backbone_from_args``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="pretraining checkpoint or exported torchvision backbone")
    source.add_argument("--random-init", action="store_true", help=random_init_help)
    add_shape_arguments(parser)


def check_backbone_arguments(parser, args) -> None:
    """A random init has no checkpoint to read its arch from: it needs ``--arch`` (else exit 2, one line)."""
    if args.random_init and not args.arch:
        parser.error("--random-init needs --arch")


# ---- one function per tool: argv (None: sys.argv[1:]) -> its parsed and checked arguments

def export_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser("maskco.export")
    parser.add_argument("checkpoint", help="pretraining checkpoint (or an exported torchvision backbone)")
    parser.add_argument("--out-dir", required=True, help="folder for the exported files")
    parser.add_argument("--arch", default=None, choices=vocab.ARCHS, metavar="ARCH",
                        help=f"expected arch, one of {', '.join(vocab.ARCHS)} (default: from the checkpoint / "
                             "key shapes)")
    parser.add_argument("--detectron2-layout", choices=DETECTRON2_LAYOUT_NAMES, default="c4",
                        help="where detectron2 keeps each stage: c4 (R50-C4, default) or fpn")
    return parser.parse_args(argv)


def knn_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser("maskco.evaluate.knn")
    add_backbone_arguments(parser)
    parser.add_argument("--train", required=True, help="labelled split for the memory bank")
    parser.add_argument("--val", required=True, help="labelled split to classify")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128, help="images per rank per step")
    parser.add_argument("--k", type=int, default=200,
                        help="neighbours (default 200, with --temperature 0.1; k=20, t=0.07 is also reported)")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--out", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    check_backbone_arguments(parser, args)
    return args


def region_args(argv: list[str] | None) -> argparse.Namespace:
    from pipelines.fmnist import DEFAULT_DIR  # numpy and PIL, no torch

    parser = _parser("maskco.evaluate.region")
    add_backbone_arguments(parser)
    parser.add_argument("--image-size", type=int, default=32, help="the pretraining view size (default 32)")
    parser.add_argument("--probe-dir", default="data/mosaic_probe", help="where the probe sets are written (reused)")
    parser.add_argument("--fmnist-dir", default=DEFAULT_DIR, help="folder of the Fashion-MNIST IDX .gz files")
    parser.add_argument("--bank", type=int, default=2500, help="bank mosaics, 4 train items each (default 2500)")
    parser.add_argument("--query", type=int, default=500, help="query mosaics, 4 test items each (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mosaics and of the random initialisation")
    parser.add_argument("--batch-size", type=int, default=128, help="mosaics per forward")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--global-baseline", action="store_true", default=True,
                        help="also each item cropped alone and globally pooled (--no-global-baseline: half the time)")
    parser.add_argument("--out", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    check_backbone_arguments(parser, args)
    return args


def localise_args(argv: list[str] | None) -> cli.ConfigArgs:
    """The trainer's grammar (presets and config keys) plus the tool's own options; ``--help`` prints the
    usage and exits 0; a bad option -> ConfigError."""
    parsed = cli.parse_config_args(sys.argv[1:] if argv is None else argv,
                                   {"checkpoint": "", "random_init": False, "images": DEFAULT_IMAGES, "out": ""})
    if parsed.help:
        print(cli.usage_text("python -m maskco.evaluate.localise", LOCALISE_SUMMARY, LOCALISE_OWN,
                             " (--checkpoint PATH | --random-init) [--images N]"))
        sys.exit(0)
    options = parsed.options
    if bool(options["checkpoint"]) == bool(options["random_init"]):
        raise cli.ConfigError("give one of --checkpoint PATH or --random-init")
    if options["images"] < 1:
        raise cli.ConfigError(f"--images must be >= 1, got {options['images']}")
    return parsed


def linear_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser("maskco.evaluate.linear")
    add_backbone_arguments(parser, random_init_help="evaluate a randomly initialised --arch (baseline)")
    parser.add_argument("--train", required=True, help="labelled training split (ImageFolder root, .txt list, ...)")
    parser.add_argument("--val", required=True, help="labelled validation split")
    parser.add_argument("--num-classes", type=int, help="class count, for sources whose classes cannot be listed")
    parser.add_argument("--protocol", choices=vocab.PROTOCOLS, default="multilayer")
    parser.add_argument("--pooling", choices=vocab.POOLINGS, default="fixed",
                        help="fixed: DESIGN 4.8's kernels (224 px); adaptive: same grids at any image size")
    parser.add_argument("--epochs", type=int, help="default: 90 (multilayer) / 100 (lastlayer)")
    parser.add_argument("--lr", type=float, help="default: 0.1 (multilayer) / 30 (lastlayer)")
    parser.add_argument("--milestones", type=int, nargs="*", help="epochs where lr /= 10; default 30 60 / 60 80")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction,
                        help="Nesterov momentum; default: on (multilayer, OpenSelfSup) / off (lastlayer, MoCo)")
    parser.add_argument("--color-jitter", action=argparse.BooleanOptionalAction,
                        help="ColorJitter(0.4, 0.4, 0.4, hue 0) on the training views; default: on / off")
    parser.add_argument("--lighting", action=argparse.BooleanOptionalAction,
                        help="PCA lighting noise (alphastd 0.1) on the training views; default: on / off "
                             "(--no-lighting for grey images, which it would tint)")
    parser.add_argument("--weight-decay", type=float, help="default: 1e-4 (multilayer) / 0 (lastlayer)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch over all ranks")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backend", default="torch", help="data backend (pipelines.build_loader)")
    parser.add_argument("--workers", type=int, default=None, help="decode workers per rank (default: backend's)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="backbone autocast; auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    parser.add_argument("--log-every", type=int, default=100, help="log the losses every N steps (0: per epoch only)")
    parser.add_argument("--out-dir", help="default: runs/linear/<checkpoint's folder>-<its name>-<its SHA-256, "
                                          "8 digits>-<protocol>, one per backbone and protocol")
    parser.add_argument("--resume", default="auto", help="auto (out_dir/linear_last.pt if present), none, or a path")
    args = parser.parse_args(argv)
    check_backbone_arguments(parser, args)
    for key, value in vocab.PROTOCOL_DEFAULTS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    _check_linear(parser, args)
    return args


def _check_linear(parser, args) -> None:
    """Each number of the linear probe in its range, else exit 2 with one line."""
    for name in ("epochs", "batch_size", "image_size", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name, ok, must in (("lr", args.lr > 0, "> 0"), ("weight_decay", args.weight_decay >= 0, ">= 0"),
                           ("momentum", 0 <= args.momentum < 1, "in [0, 1)"),
                           ("log_every", args.log_every >= 0, ">= 0"), ("seed", args.seed >= 0, ">= 0")):
        if not (math.isfinite(getattr(args, name)) and ok):
            parser.error(f"--{name.replace('_', '-')} must be finite and {must}, got {getattr(args, name)}")
    if any(m < 1 for m in args.milestones):
        parser.error(f"--milestones must be epochs >= 1, got {args.milestones}")
    if args.nesterov and args.momentum <= 0:
        parser.error("--nesterov needs --momentum > 0 (or pass --no-nesterov)")


# ---- detection fine-tuning (maskco.evaluate.detect)

# Each preset sizes the detector and its schedule for a kind of data. voc / coco: MoCo's detectron2 configs
# (VOC07+12 R50-C4 24k; COCO R50-C4 2x), 16 images per batch; scenes: pipelines.scenes' 64 px canvases on a
# CPU (no resize, anchors and RoIs for 12-40 px garments, RoIAlign 8 x 8 into res5; at most 6 garments a scene, so
# 100 proposals and 20 detections per test image, where detectron2 keeps 1000 and 100). proposals: the RPN's
# boxes kept after NMS per image (training, test); detections: per test image. The schedule's shape is
# the VOC config's: linear warm-up, then lr / 10 at each milestone (fractions of the iterations: VOC's
# 18k / 22k of 24k are 3/4 and 11/12; COCO 2x's 120k / 160k of 180k are 2/3 and 8/9).
DETECT_PRESETS = {
    "scenes": {"iterations": 600, "batch_size": 8, "lr": 0.02, "warmup": 100, "milestones": (3 / 4, 11 / 12),
               "min_size": (64,), "test_size": 64, "max_size": 64, "anchor_sizes": (12, 24, 48), "roi_size": 8,
               "rois_per_image": 32, "rpn_batch": 64, "proposals": (300, 100), "detections": 20, "workers": 0},
    "voc": {"iterations": 24000, "batch_size": 16, "lr": 0.02, "warmup": 100, "milestones": (3 / 4, 11 / 12),
            "min_size": tuple(range(480, 801, 32)), "test_size": 800, "max_size": 1333,
            "anchor_sizes": (32, 64, 128, 256, 512), "roi_size": 14, "rois_per_image": 512, "rpn_batch": 256,
            "proposals": (2000, 1000), "detections": 100, "workers": 8},
    "coco": {"iterations": 180000, "batch_size": 16, "lr": 0.02, "warmup": 100, "milestones": (2 / 3, 8 / 9),
             "min_size": tuple(range(640, 801, 32)), "test_size": 800, "max_size": 1333,
             "anchor_sizes": (32, 64, 128, 256, 512), "roi_size": 14, "rois_per_image": 512, "rpn_batch": 256,
             "proposals": (2000, 1000), "detections": 100, "workers": 8},
}
DETECT_LAYOUTS = ("c4", "fpn")  # detection_model.LAYOUTS (a test checks)
DETECT_FORMATS = ("auto", "coco", "voc")  # detection_data.FORMATS


def detect_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser("maskco.evaluate.detect")
    add_backbone_arguments(parser)
    parser.add_argument("--data", required=True, help="a COCO-layout folder (annotations/instances_<split>.json and "
                                                      "<split>/, e.g. pipelines.scenes) or a VOC root (VOCdevkit)")
    parser.add_argument("--format", choices=DETECT_FORMATS, default="auto", help="auto: from the folder's layout")
    parser.add_argument("--train-split", help="default: train (COCO layout), 2007-trainval+2012-trainval (VOC)")
    parser.add_argument("--test-split", help="default: test (COCO layout), 2007-test (VOC)")
    parser.add_argument("--preset", choices=sorted(DETECT_PRESETS), default="scenes",
                        help="sizes and schedule (default scenes: 64 px canvases on a CPU; voc, coco: MoCo's configs)")
    parser.add_argument("--layout", choices=DETECT_LAYOUTS, default="c4",
                        help="c4: the paper's R50-C4 (RPN on C4, res5 as the box head); fpn: a feature pyramid")
    for name, kind, text in (("iterations", int, "training iterations"), ("batch-size", int, "images per iteration"),
                             ("lr", float, "peak learning rate"), ("warmup", int, "linear warm-up iterations"),
                             ("roi-size", int, "RoIAlign output side"), ("rois-per-image", int, "RoIs per image"),
                             ("workers", int, "image decode workers (0: in the main process)")):
        parser.add_argument(f"--{name}", type=kind, help=f"{text} (default: the preset's)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="data order, flips and the heads' initialisation")
    parser.add_argument("--out-dir", help="default: runs/detect/<checkpoint's folder or random-<arch>>-<layout>")
    parser.add_argument("--predictions", help="also write the test detections here, in COCO's results format")
    parser.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N iterations (and on a signal)")
    parser.add_argument("--resume", default="auto", help="auto (out_dir/detector_last.pt if present), none, or a path")
    args = parser.parse_args(argv)
    check_backbone_arguments(parser, args)
    for key, value in DETECT_PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for name in ("iterations", "batch_size", "roi_size", "rois_per_image", "ckpt_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name, ok, must in (("lr", args.lr > 0, "> 0"), ("weight_decay", args.weight_decay >= 0, ">= 0"),
                           ("momentum", 0 <= args.momentum < 1, "in [0, 1)"), ("warmup", args.warmup >= 0, ">= 0"),
                           ("workers", args.workers >= 0, ">= 0"), ("seed", args.seed >= 0, ">= 0")):
        if not (math.isfinite(getattr(args, name)) and ok):
            parser.error(f"--{name.replace('_', '-')} must be finite and {must}, got {getattr(args, name)}")
    return args
