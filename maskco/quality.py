"""``python -m maskco.quality`` (``make quality``): does pretraining make a better backbone than random init?

For one fixed budget of steps, identical for every method, on the same Fashion-MNIST images and seed:

1. write (or reuse) the Fashion-MNIST splits (``pipelines.fmnist``): unlabelled pretraining images,
   a labelled train split (kNN bank, linear training) and a labelled test split;
2. pretrain each variant through the trainer's own entry point (``maskco.train.main``, preset
   ``quality_<preset>`` + the variant's overrides + any ``--key=value`` given here), each in its own
   ``out_dir/<variant>``, with the trainer's kNN monitor after every epoch (a curve, not one number);
3. evaluate each exported backbone and a randomly initialised one on the test split: kNN top-1
   (``maskco.evaluate.knn``; for a pretrained variant its last monitor point, the same function on the
   same backbone) and linear top-1, last-layer and multi-layer protocols on a short schedule
   (``maskco.evaluate.linear``);
4. write ``out_dir/quality.jsonl`` (a settings row, then one row per method), a table on the terminal
   and ``out_dir/quality.png`` (kNN top-1 against steps, random init as a line).

    python -m maskco.quality                                   # CPU preset, about 30 min on 2 cores
    python -m maskco.quality --variants maskco,mocov2,maskco_no_mph,maskco_no_mask --momentum=0.999
    python -m maskco.quality --preset gpu                      # ResNet-50 at 224 px, 7,800 steps
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from maskco import cli
from maskco.config import ConfigError, build_config, method_label

# The trainer's overrides per variant, on top of the preset. MoCo v2 takes the MOCOV2 values of
# maskco.config (no MPH, queue only, wd on all, no warm-up) except what the preset sets (momentum,
# lr: the short-run choices, the same for every method) and the queue size of the harness preset.
VARIANTS = {
    "maskco": [],
    "mocov2": ["--method=mocov2", "--warmup_epochs=0"],
    "maskco_half_pixel": ["--roi_centering=half_pixel"],  # the old box -> C5 mapping (fidelity issue)
    "maskco_no_mph": ["--mph=none"],  # the paper's ablations
    "maskco_no_mask": ["--mask_mode=none"],
}
# What is not a trainer setting. queue: MoCo v2's queue; 65,536 needs 2,048 steps of 32 to fill once, so
# a 480-step CPU run uses 4,096 (4 x 32 steps of keys, about a third of an epoch) and is labelled so.
PRESETS = {
    "cpu": {"config": "quality_cpu", "pretrain": 3840, "train": 2000, "test": 1000, "linear_epochs": 6,
            "linear_batch": 64, "queue": 4096},
    "gpu": {"config": "quality_gpu", "pretrain": 49920, "train": 10000, "test": 10000, "linear_epochs": 20,
            "linear_batch": 256, "queue": 65536},
}
RESULTS, FIGURE = "quality.jsonl", "quality.png"


def parse_args(argv):
    parser = cli.ArgumentParser(prog="python -m maskco.quality", description=__doc__.split("\n\n")[0],
                                epilog="Any other --key=value (or --key value) is a trainer override applied to "
                                       "every variant; python -m maskco.train --help lists them.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--variants", default="maskco,mocov2,maskco_half_pixel",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--fmnist-dir", default=None, help="folder of the Fashion-MNIST IDX .gz files")
    parser.add_argument("--data-dir", default="data/fmnist", help="where the image-folder splits are written")
    parser.add_argument("--out-dir", default="runs/quality")
    for name in ("pretrain", "train", "test"):
        parser.add_argument(f"--{name}-images", type=int, help="default: the preset's")
    parser.add_argument("--linear-epochs", type=int, help="default: the preset's (lr / 10 at 2/3 and 5/6)")
    parser.add_argument("--linear-batch", type=int, help="default: the preset's")
    parser.add_argument("--queue", type=int, help="MoCo v2's queue size (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args, rest = parser.parse_known_args(argv)
    try:  # the rest is trainer overrides, in the trainer's grammar
        trainer = cli.parse_config_args(rest)
    except ConfigError as error:
        parser.error(str(error))
    overrides = trainer.config
    bad = [arg for arg in overrides if not arg.startswith("--")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (trainer overrides look like --key=value)")
    names = [name for name in args.variants.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    for key, value in PRESETS[args.preset].items():
        attribute = {"pretrain": "pretrain_images", "train": "train_images", "test": "test_images"}.get(key, key)
        if getattr(args, attribute, None) is None:
            setattr(args, attribute, value)
    args.variants, args.overrides = names, overrides
    return args


def trainer_args(args, variant: str, splits: dict) -> list[str]:
    """The trainer's argv for ``variant``: preset, variant, the user's overrides, then what the harness fixes."""
    extra = [f"--queue_size={args.queue}"] if variant == "mocov2" else []
    return [args.config, *VARIANTS[variant], *extra, *args.overrides,
            f"--data={splits['pretrain']}", f"--knn_train={splits['train']}", f"--knn_val={splits['test']}",
            f"--seed={args.seed}", f"--out_dir={os.path.join(args.out_dir, variant)}", "--resume=none",
            "--export=true", "--max_steps=0"]


def linear_top1(args, cfg, source: list[str], out_dir: str) -> dict:
    """Top-1 (%) of the last-layer protocol and of each stage of the multi-layer one, short schedule."""
    from maskco.evaluate import linear

    epochs = args.linear_epochs
    milestones = sorted({max(1, round(epochs * 2 / 3)), max(1, round(epochs * 5 / 6))})
    common = [*source, "--arch", cfg.arch, "--train", args.splits["train"], "--val", args.splits["test"],
              "--image-size", str(cfg.image_size), "--pooling", "adaptive", "--epochs", str(epochs),
              "--milestones", *map(str, milestones), "--batch-size", str(args.linear_batch),
              "--seed", str(args.seed), "--resume", "none", "--log-every", "0",
              *(["--workers", str(cfg.workers)] if cfg.workers >= 0 else [])]
    out = {}
    for protocol in ("lastlayer", "multilayer"):
        result = linear.main([*common, "--protocol", protocol,
                              "--out-dir", os.path.join(out_dir, f"linear_{protocol}")])
        prefix = "linear_last" if protocol == "lastlayer" else "linear_multi"
        out.update({f"{prefix}_{stage}": acc["top1"] for stage, acc in result.items() if stage != "images"})
    return out


def random_init_row(args, cfg) -> dict:
    from maskco.evaluate import knn

    began = time.time()
    out_dir = os.path.join(args.out_dir, "random_init")
    os.makedirs(out_dir, exist_ok=True)
    record = knn.main(["--random-init", "--arch", cfg.arch, "--train", args.splits["train"], "--val",
                       args.splits["test"], "--image-size", str(cfg.image_size), "--batch-size", str(cfg.batch_size),
                       "--seed", str(args.seed), "--out", os.path.join(out_dir, "knn.json"),
                       *(["--workers", str(cfg.workers)] if cfg.workers >= 0 else [])])
    row = {"method": "random_init", "label": f"random init ({cfg.arch})", "steps": 0, "knn_curve": [],
           "knn_top1": record["knn_top1"]}
    row.update(linear_top1(args, cfg, ["--random-init"], out_dir))
    return {**row, "seconds": round(time.time() - began, 1)}


def variant_row(args, variant: str) -> dict:
    from maskco import train
    from maskco.export import TORCHVISION_FILE

    argv = trainer_args(args, variant, args.splits)
    cfg = build_config(argv)
    out_dir = cfg.out_dir
    if os.path.exists(os.path.join(out_dir, "log.jsonl")):
        shutil.rmtree(out_dir)  # a previous quality run of this variant: the log appends, so start clean
    began = time.time()
    code = train.main(argv)
    if code != 0:
        raise RuntimeError(f"pretraining {variant} stopped with exit code {code} (see {out_dir}/log.jsonl)")
    seconds = time.time() - began
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as handle:
        log = [json.loads(line) for line in handle]
    curve = [[r["step"], r["knn_top1"]] for r in log if "knn_top1" in r]
    finished = next(r for r in log if r.get("finished"))
    losses = [r["loss"] for r in log if "loss" in r]
    row = {"method": variant, "label": method_label(cfg), "steps": finished["step"], "knn_curve": curve,
           "knn_top1": curve[-1][1] if curve else None, "first_loss": losses[0], "last_loss": losses[-1],
           "pretrain_seconds": round(seconds, 1)}
    row.update(linear_top1(args, cfg, ["--checkpoint", os.path.join(out_dir, TORCHVISION_FILE)], out_dir))
    return {**row, "seconds": round(time.time() - began, 1)}


def prepare_data(args) -> dict:
    """The splits (written by local rank 0; other local ranks wait for its marker)."""
    from pipelines import fmnist

    source = args.fmnist_dir or fmnist.DEFAULT_DIR
    sizes = (args.pretrain_images, args.train_images, args.test_images)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return fmnist.write_splits(args.data_dir, source, *sizes, seed=args.seed)
    marker = os.path.join(args.data_dir, fmnist.MARKER)
    while not os.path.exists(marker):
        time.sleep(1)
    return {split: os.path.abspath(os.path.join(args.data_dir, split)) for split in ("pretrain", "train", "test")}


def main(argv=None) -> int:
    from maskco import quality_report
    from pipelines import DataError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.config = PRESETS[args.preset]["config"]
    try:
        cfg = build_config([args.config, *args.overrides])
        args.splits = prepare_data(args)
    except (ConfigError, DataError, ValueError) as error:
        print(f"maskco.quality: error: {error}", file=sys.stderr)
        return 2
    lead = os.environ.get("RANK", "0") == "0"
    os.makedirs(args.out_dir, exist_ok=True)
    results = os.path.join(args.out_dir, RESULTS)
    steps = cfg.epochs * (args.pretrain_images // (cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1"))))
    settings = {"settings": True, "preset": args.preset, "variants": args.variants, "overrides": args.overrides,
                "budget_steps": steps, "arch": cfg.arch, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
                "images": {"pretrain": args.pretrain_images, "train": args.train_images, "test": args.test_images},
                "linear_epochs": args.linear_epochs, "linear_batch": args.linear_batch, "seed": args.seed,
                "splits": args.splits}
    rows, began = [], time.time()
    if lead:
        with open(results, "w", encoding="utf-8") as handle:  # one row per finished method, as it comes
            handle.write(json.dumps(settings) + "\n")
    for name in ["random_init", *args.variants]:
        row = random_init_row(args, cfg) if name == "random_init" else variant_row(args, name)
        rows.append(row)
        if lead:
            with open(results, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
    if lead:
        figure = quality_report.plot(rows, settings, os.path.join(args.out_dir, FIGURE))
        print(quality_report.table(rows, settings, time.time() - began))
        print(f"results: {results}\nfigure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
