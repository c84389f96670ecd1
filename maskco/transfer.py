"""``python -m maskco.transfer`` (``make transfer``): the paper's claim, measured: pretrain on single objects or on
many-object scenes, fine-tune a detector, and compare MaskCo with MoCo v2.

For each seed, every backbone is measured the same way:

1. write (or reuse) the data: the Fashion-MNIST splits of ``make quality`` (``pipelines.fmnist``: single
   garments, all 60,000 train images) and the scenes (``pipelines.scenes``: 64 px canvases of 1-6 garments;
   unlabelled pretraining scenes from train items, detection train scenes from other train items, detection
   test scenes from test items, COCO annotations);
2. pretrain MoCo v2 and MaskCo through the trainer (``maskco.train``, preset ``quality_cpu``: 32 px views, the
   small-stem ResNet-18 at width 0.25, 8 virtual GPUs of 32; with MoCo v2's colour augmentation, ``COLOUR``),
   and the supervised arm (``maskco.supervised``: the same network and views with the labels: one class per
   garment, the classes present per scene), **the
   same number of steps on both pretraining sets**: single garments for ``--epochs`` epochs, scenes for as
   many steps;
3. fine-tune a Faster R-CNN on the detection train scenes and score it on the test scenes with pycocotools
   (``maskco.evaluate.detect``, R50-C4 layout: RPN on C4, the pretrained res5 as the box head, every layer and
   BatchNorm trained) for every backbone and for random init, **with one schedule for all**: the ``scenes``
   preset's (chosen on random init before any pretrained backbone was fine-tuned);
4. write ``out_dir/transfer.jsonl`` (a settings row, then one row per method and pretraining set with
   ``det_ap``, ``det_ap50``, ``det_ap75``: means over seeds, their spread and ``per_seed``), a table on the
   terminal in the paper's shape and ``out_dir/transfer.png``.

Every stage is kept in its own folder and reused when it has finished, so an interrupted ``make transfer``
continues where it stopped. ``--quality DIR`` takes the single-garment backbones from a finished
``make quality`` run instead of pretraining them (the scenes then get as many steps as its runs had).

    python -m maskco.transfer                          # one seed: random init, MoCo v2, MaskCo, supervised
    python -m maskco.transfer --seeds 0,1,2            # mean and spread over three seeds
    python -m maskco.transfer --quality runs/quality   # reuse make quality's single-garment backbones
"""
from __future__ import annotations

import json
import os
import sys
import time

from maskco import cli
from maskco.config import ConfigError, build_config

METHODS = ("random_init", "mocov2", "maskco", "supervised")
PRETRAIN_DATA = ("single", "scenes")
VARIANTS = {"mocov2": ["--method=mocov2"], "maskco": [], "supervised": []}  # trainer overrides, on the preset
PRESET = "quality_cpu"  # the trainer's settings for every method (make quality's)
# ... with MoCo v2's colour augmentation back (saturation and hue jitter, grey conversion): the preset drops it
# for grey garments, where it changes nothing, but a scene's background has one random colour that both views
# and all their boxes share, a shortcut that contrast learns instead of the garments (BENCHMARKS.md, transfer)
COLOUR = ["--jitter=[0.4,0.4,0.4,0.1]", "--gray_prob=0.2"]
QUEUE = 4096  # MoCo v2's queue on the CPU (make quality's: 16 steps of 256 keys)
SPLITS = {"pretrain": 60000, "train": 10000, "test": 2000}  # make quality's Fashion-MNIST splits (reused)
SCENES = {"pretrain": 30000, "train": 4000, "test": 1000}  # half as many pretraining scenes: twice the epochs
RESULTS, FIGURE = "transfer.jsonl", "transfer.png"


class StageEnded(Exception):
    """A pretraining run ended without finishing: stopped by a signal (its checkpoint is kept; the same command
    continues it), or failed (its own line already says why). ``code``: its exit code, which this command exits with."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def parse_args(argv):
    parser = cli.ArgumentParser(prog="python -m maskco.transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/transfer", help="where every run and the results go")
    parser.add_argument("--data-dir", default="data", help="where the Fashion-MNIST splits and the scenes are written")
    parser.add_argument("--fmnist-dir", default=None, help="folder of the Fashion-MNIST IDX .gz files")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--pretrain-data", default=",".join(PRETRAIN_DATA),
                        help="comma-separated, from single (one garment an image), scenes (1-6 garments)")
    parser.add_argument("--epochs", type=int, default=1,
                        help="pretraining epochs of the single garments (default 1: 234 steps of 256); the scenes "
                             "get as many steps")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; rows give the mean and the spread")
    parser.add_argument("--quality", help="a finished make quality out dir: its single-garment backbones are used")
    parser.add_argument("--det-iterations", type=int, help="detection fine-tuning iterations (default: the scenes "
                                                          "preset's)")
    parser.add_argument("--single-images", type=int, default=SPLITS["pretrain"],
                        help=f"single-garment pretraining images (default {SPLITS['pretrain']}: every train image)")
    parser.add_argument("--scenes", type=int, nargs=3, metavar=("PRETRAIN", "TRAIN", "TEST"),
                        default=[SCENES["pretrain"], SCENES["train"], SCENES["test"]],
                        help=f"scene counts (default {SCENES['pretrain']} {SCENES['train']} {SCENES['test']})")
    args = parser.parse_args(argv)
    args.methods = _choices(parser, "--methods", args.methods, METHODS)
    args.pretrain_data = _choices(parser, "--pretrain-data", args.pretrain_data, PRETRAIN_DATA)
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or min(args.epochs, args.single_images, *args.scenes) < 1:
        parser.error("--seeds needs at least one seed; --epochs and the image and scene counts must be >= 1")
    if args.quality and len(args.seeds) > 1:
        parser.error("--quality reuses one make quality run: give one seed (its seed)")
    return args


def _choices(parser, flag: str, text: str, allowed: tuple) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        parser.error(f"{flag}: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    return names


# ---- pretraining

def pretrain_args(args, method: str, data: str, seed: int) -> list[str]:
    """The trainer's argv for ``method`` on ``data`` (single or scenes) and ``seed``: same preset, same steps."""
    source = args.splits["pretrain"] if data == "single" else args.scenes_paths["pretrain"]
    if method == "supervised" and data == "scenes":
        source = args.scenes_paths["pretrain_labels"]  # the classes present, for the multi-label loss
    epochs = args.epochs if data == "single" else args.scene_epochs
    extra = [f"--queue_size={QUEUE}"] if method == "mocov2" else []
    return [PRESET, *COLOUR, *VARIANTS[method], *extra, f"--data={source}", f"--epochs={epochs}", "--knn_every=0",
            f"--knn_train={args.splits['train']}", f"--knn_val={args.splits['test']}", f"--seed={seed}",
            f"--out_dir={os.path.join(args.out_dir, f'{method}-{data}-seed{seed}')}", "--export=true",
            "--max_steps=0"]


def pretrain(args, method: str, data: str, seed: int) -> dict:
    """Pretrain (or reuse a finished run) -> {"backbone", "steps", "seconds"}."""
    from maskco import supervised, train

    if args.quality and data == "single":
        return quality_backbone(args.quality, method)
    argv = pretrain_args(args, method, data, seed)
    cfg = build_config(argv)
    done = os.path.join(cfg.out_dir, "pretrained.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as handle:
            return json.load(handle)
    began = time.time()
    if method == "supervised":
        os.makedirs(cfg.out_dir, exist_ok=True)
        result = supervised.train_supervised(cfg, classes=10, log_path=os.path.join(cfg.out_dir, "log.jsonl"),
                                             multilabel=data == "scenes")
        record = {"backbone": result["exported"], "steps": result["step"]}
    else:
        code = train.main(argv)  # resumes a run this command started before, if any
        if code != 0:
            how = "was stopped; the same command continues it" if code in (130, 143) else "failed"
            raise StageEnded(f"pretraining {method} on {data} {how} (exit code {code}; {cfg.out_dir}/log.jsonl)", code)
        finished = _finished(os.path.join(cfg.out_dir, "log.jsonl"))
        record = {"backbone": finished["exported"], "steps": finished["step"]}
    record["seconds"] = round(time.time() - began, 1)
    with open(done, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    return record


def _finished(log_path: str) -> dict:
    with open(log_path, encoding="utf-8") as handle:
        return [record for record in map(json.loads, handle) if record.get("finished")][-1]


def quality_backbone(quality_dir: str, method: str) -> dict:
    """A finished ``make quality`` run's backbone of ``method`` -> {"backbone", "steps", "seconds": 0}."""
    folder = os.path.join(quality_dir, method)
    try:
        if method == "supervised":
            backbone = os.path.join(folder, "backbone.pth")
            with open(os.path.join(folder, "log.jsonl"), encoding="utf-8") as handle:
                steps = max(record.get("step", 0) for record in map(json.loads, handle))
        else:
            finished = _finished(os.path.join(folder, "log.jsonl"))
            backbone, steps = finished["exported"], finished["step"]
    except (OSError, ValueError, IndexError, KeyError) as error:
        raise ValueError(f"--quality {quality_dir}: no finished {method} run in {folder} ({error})") from None
    if not os.path.isfile(backbone):
        raise ValueError(f"--quality {quality_dir}: {backbone} is missing")
    return {"backbone": backbone, "steps": steps, "seconds": 0.0}


# ---- detection

def detect(args, method: str, data: str | None, seed: int, backbone: str | None) -> dict:
    """Fine-tune and score the detector on ``backbone`` (None: random init of the preset's shape)."""
    from maskco.evaluate import detect as detection

    cfg = build_config([PRESET])
    source = (["--checkpoint", backbone] if backbone else
              ["--random-init", "--arch", cfg.arch, "--stem", cfg.stem, "--width", str(cfg.width), "--init", cfg.init])
    name = f"detect-{method}" + (f"-{data}" if data else "") + f"-seed{seed}"
    extra = ["--iterations", str(args.det_iterations)] if args.det_iterations else []
    return detection.main([*source, "--data", args.scenes_paths["root"], "--preset", "scenes", "--layout", "c4",
                           "--seed", str(seed), *extra, "--out-dir", os.path.join(args.out_dir, name),
                           "--predictions", os.path.join(args.out_dir, name, "predictions.json")])


# ---- the command

def prepare_data(args) -> None:
    from pipelines import fmnist, scenes

    source = args.fmnist_dir or fmnist.DEFAULT_DIR
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        raise ConfigError("make transfer runs in one process (the trainer's virtual GPUs stand in for several)")
    # the labelled splits are make quality's (so the two share one folder); a smaller copy of the data gets all
    available = {split: len(fmnist.load_split(source, name)[1])
                 for split, name in (("train", "train"), ("test", "t10k"))}
    args.splits = fmnist.write_splits(os.path.join(args.data_dir, "fmnist"), source, args.single_images,
                                      min(SPLITS["train"], available["train"]), min(SPLITS["test"], available["test"]),
                                      seed=0)
    args.scenes_paths = scenes.write_scenes(os.path.join(args.data_dir, "scenes"), source, *args.scenes, seed=0)


def scene_epochs(args) -> int:
    """Epochs of the scenes that give as many steps as the single garments' run: its steps / scene steps per epoch."""
    cfg = build_config([PRESET])
    single_steps = (quality_backbone(args.quality, "maskco")["steps"] if args.quality
                    else args.epochs * (args.single_images // cfg.batch_size))
    per_epoch = args.scenes[0] // cfg.batch_size
    if per_epoch < 1 or single_steps % per_epoch:
        raise ValueError(f"{args.scenes[0]} pretraining scenes make {per_epoch} steps of {cfg.batch_size} an epoch, "
                         f"which does not divide the single garments' {single_steps} steps: pick a count that does")
    return single_steps // per_epoch


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from maskco import transfer_report  # torch loads here, after the arguments are good (--help needs none)
    from pipelines import DataError

    try:
        prepare_data(args)
        args.scene_epochs = scene_epochs(args)
    except (ConfigError, DataError, ValueError, OSError) as error:
        return cli.fail("maskco.transfer", error)
    os.makedirs(args.out_dir, exist_ok=True)
    settings = {"settings": True, "preset": PRESET, "methods": args.methods, "pretrain_data": args.pretrain_data,
                "seeds": args.seeds, "epochs_single": args.epochs, "epochs_scenes": args.scene_epochs,
                "quality": args.quality, "scenes": args.scenes_paths, "splits": args.splits,
                "det_iterations": args.det_iterations}
    results = os.path.join(args.out_dir, RESULTS)
    with open(results, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(settings) + "\n")
    began, rows = time.time(), []
    jobs = [(method, None if method == "random_init" else data) for method in args.methods
            for data in (["none"] if method == "random_init" else args.pretrain_data)]
    try:
        for method, data in jobs:
            per_seed = []
            for seed in args.seeds:
                stage = time.time()
                pretrained = pretrain(args, method, data, seed) if data else {"backbone": None, "steps": 0}
                result = detect(args, method, data, seed, pretrained["backbone"])
                per_seed.append({"seed": seed, "ap": result["ap"], "ap50": result["ap50"], "ap75": result["ap75"],
                                 "pretrain_steps": pretrained["steps"], "seconds": round(time.time() - stage, 1)})
            rows.append(transfer_report.row(method, data or "none", per_seed))
            with open(results, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(rows[-1]) + "\n")
    except (ConfigError, DataError, ValueError) as error:
        return cli.fail("maskco.transfer", error)
    except StageEnded as ended:
        print(f"maskco.transfer: {ended}", file=sys.stderr)
        return ended.code
    figure = transfer_report.plot(rows, os.path.join(args.out_dir, FIGURE))
    print(transfer_report.table(rows, settings, time.time() - began))
    print(f"results: {results}\nfigure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
