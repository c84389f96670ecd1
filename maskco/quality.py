"""``python -m maskco.quality`` (``make quality``): does pretraining make a better backbone than random init?

For one fixed budget of epochs, identical for every method, on the same Fashion-MNIST images and seeds:

1. write (or reuse) the Fashion-MNIST splits (``pipelines.fmnist``): every train image as unlabelled
   pretraining data (``--data mosaics``: 2 x 2 mosaics of them instead, ``pipelines.mosaics``; ``--data scenes``:
   scenes of 1-6 garments, ``pipelines.scenes``), a
   labelled train split (the kNN bank, linear training) and a labelled test split; and the region
   probe's mosaics (bank from train items, queries from test items);
2. pretrain each variant through the trainer's own entry point (``maskco.train.main``, preset
   ``quality_<preset>`` + the variant's overrides + any ``--key=value`` given here), each in its own
   ``out_dir/<variant>[-seed<s>]``, with the trainer's kNN monitor after every epoch (a curve); the
   ``supervised`` variant trains the same network on the same views with the labels (the ceiling,
   ``maskco.supervised``);
3. evaluate every backbone the same way, random init (one per architecture) included: kNN top-1 at
   k = 200, t = 0.1 and k = 20, t = 0.07 (``maskco.evaluate.knn``; for a trained variant its last
   monitor point, the same function on the same backbone), the region probe (``maskco.evaluate.region``)
   and linear top-1, last-layer and multi-layer protocols on a short schedule (``maskco.evaluate.linear``);
4. write ``out_dir/quality.jsonl`` (a settings row, then one row per method: the mean over seeds, each
   seed's figures in ``per_seed``), a table on the terminal and ``out_dir/quality.png`` (kNN top-1
   against epochs, random init as a line).

    python -m maskco.quality                                   # CPU preset: random init, MoCo v2, MaskCo, supervised
    python -m maskco.quality --variants mocov2,mocov2_one_gpu,mocov2_3840,mocov2_96px,mocov2_batch32
    python -m maskco.quality --data mosaics                    # pretrain on 2 x 2 mosaics (many objects per image)
    python -m maskco.quality --seeds 0,1,2                     # mean and spread over seeds
    python -m maskco.quality --preset gpu                      # the same protocol at full width, on a GPU
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
# maskco.config (no MPH, queue only, wd on all, no warm-up) except what the preset sets (temperature,
# momentum, lr, weight decay: the short-run choices, the same for every method) and the queue size of
# the harness preset. The mocov2_* variants step from this preset back towards the old one, one factor
# at a time (BENCHMARKS.md, "Why the old setup failed").
VARIANTS = {
    "maskco": [],
    "mocov2": ["--method=mocov2"],
    "supervised": [],  # the same network and views trained with the labels (maskco.supervised)
    "maskco_intra": ["--intra_negatives=true"],  # MaskCo(+in)
    "maskco_half_pixel": ["--roi_centering=half_pixel"],  # the old box -> C5 mapping (DESIGN 4.4)
    "maskco_no_mph": ["--mph=none"],  # the paper's ablations
    "maskco_no_mask": ["--mask_mode=none"],
    "mocov2_one_gpu": ["--method=mocov2", "--virtual_gpus=1"],  # one BatchNorm group of 256
    "mocov2_3840": ["--method=mocov2"],  # 3,840 pretraining images (SUBSETS), as many steps
    "mocov2_96px": ["--method=mocov2", "--image_size=96", "--stem=imagenet"],  # upsampled, ImageNet stem
    "mocov2_batch32": ["--method=mocov2", "--batch_size=32", "--virtual_gpus=1"],  # one GPU of 32
    "mocov2_torchvision_init": ["--method=mocov2", "--init=torchvision"],  # torchvision's conv init (its own floor)
}
SUBSETS = {"mocov2_3840": 3840}  # variant -> pretraining images (the first of the pretraining split)
# What is not a trainer setting. queue: MoCo v2's queue (16 steps of 256 keys on the CPU). probe: the
# region probe's bank and query mosaics (4 items each). mosaics: pretraining mosaics for --data mosaics.
PRESETS = {
    "cpu": {"config": "quality_cpu", "pretrain": 60000, "train": 10000, "test": 2000, "linear_epochs": 2,
            "linear_batch": 256, "queue": 4096, "probe": (2500, 500), "mosaics": 15000},
    "gpu": {"config": "quality_gpu", "pretrain": 60000, "train": 10000, "test": 10000, "linear_epochs": 10,
            "linear_batch": 256, "queue": 16384, "probe": (2500, 2500), "mosaics": 15000},
}
RESULTS, FIGURE = "quality.jsonl", "quality.png"
# the figures of a row that are averaged over seeds
METRICS = ("knn_top1", "knn_top1_k20", "region_knn_top1", "region_knn_top1_k20", "region_knn_top1_global",
           "region_knn_top1_global_k20", "localise_top1")
LOCALISE_IMAGES = 512  # test images whose masked box is looked for in the other view (maskco.evaluate.localise)


def parse_args(argv):
    parser = cli.ArgumentParser(prog="python -m maskco.quality", description=__doc__.split("\n\n")[0],
                                epilog="Any other --key=value (or --key value) is a trainer override applied to "
                                       "every variant; python -m maskco.train --help lists them.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--variants", default="mocov2,maskco,supervised",
                        help=f"comma-separated, from {', '.join(VARIANTS)} (random init is always measured)")
    parser.add_argument("--data", choices=("fmnist", "mosaics", "scenes"), default="fmnist",
                        help="pretraining images: single garments, 2 x 2 mosaics of them, or scenes of 1-6 garments "
                             "(pipelines.scenes)")
    parser.add_argument("--fmnist-dir", default=None, help="folder of the Fashion-MNIST IDX .gz files")
    parser.add_argument("--data-dir", default="data/fmnist", help="where the image-folder splits are written")
    parser.add_argument("--out-dir", default=None, help="default: runs/quality (runs/quality-mosaics)")
    for name in ("pretrain", "train", "test"):
        parser.add_argument(f"--{name}-images", type=int, help="default: the preset's")
    parser.add_argument("--linear-epochs", type=int, help="default: the preset's (lr / 10 at 2/3 and 5/6); 0: none")
    parser.add_argument("--linear-batch", type=int, help="default: the preset's")
    parser.add_argument("--queue", type=int, help="MoCo v2's queue size (default: the preset's)")
    parser.add_argument("--probe-mosaics", type=int, nargs=2, metavar=("BANK", "QUERY"), dest="probe",
                        help="the region probe's bank and query mosaics, 4 items each (default: the preset's)")
    parser.add_argument("--mosaics", type=int,
                        help="pretraining mosaics or scenes with --data mosaics | scenes (default: the preset's)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; rows give the mean and the spread")
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
    if args.data != "fmnist" and "supervised" in names:
        names.remove("supervised")  # a mosaic or a scene has several labels: no single-label ceiling
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    for key, value in PRESETS[args.preset].items():
        attribute = {"pretrain": "pretrain_images", "train": "train_images", "test": "test_images"}.get(key, key)
        if getattr(args, attribute, None) is None:
            setattr(args, attribute, value)
    args.out_dir = args.out_dir or ("runs/quality" if args.data == "fmnist" else f"runs/quality-{args.data}")
    args.variants, args.overrides = names, overrides
    return args


def trainer_args(args, variant: str, seed: int) -> list[str]:
    """The trainer's argv for ``variant``: preset, variant, the harness's defaults, the user's overrides, then
    what the harness derives from them (a subset variant's epochs, from the epochs the user asked for)."""
    extra = [f"--queue_size={args.queue}"] if variant.startswith("mocov2") else []
    data, derived = args.splits["pretrain"], []
    if variant in SUBSETS:  # fewer images, as many steps (and kNN points) as the others
        data = subset_list(data, SUBSETS[variant], os.path.join(args.out_dir, f"{variant}_images.txt"))
        base = build_config([args.config, *args.overrides])
        full = args.pretrain_images // base.batch_size
        epochs = max(1, round(base.epochs * full / (SUBSETS[variant] // base.batch_size)))
        derived = [f"--epochs={epochs}", f"--knn_every={max(1, epochs // base.epochs) * base.knn_every}"]
    suffix = f"-seed{seed}" if len(args.seeds) > 1 else ""
    return [args.config, *VARIANTS[variant], *extra, *args.overrides, *derived,
            f"--data={data}", f"--knn_train={args.splits['train']}", f"--knn_val={args.splits['test']}",
            f"--seed={seed}", f"--out_dir={os.path.join(args.out_dir, variant + suffix)}", "--resume=none",
            "--export=true", "--max_steps=0"]


def subset_list(folder: str, count: int, path: str) -> str:
    """A ``.txt`` list of the first ``count`` images of ``folder`` in file-name order (Fashion-MNIST's own
    order, which mixes the classes; the class folders' order would not), the same every time."""
    from pipelines.sources import list_images

    images = sorted(list_images(folder).paths, key=os.path.basename)[:count]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(images) + "\n")
    return path


def linear_top1(args, cfg, source: list[str], out_dir: str) -> dict:
    """Top-1 (%) of the last-layer protocol and of each stage of the multi-layer one, short schedule."""
    from maskco.evaluate import linear

    epochs = args.linear_epochs
    if not epochs:
        return {}
    milestones = sorted({max(1, round(epochs * 2 / 3)), max(1, round(epochs * 5 / 6))})
    common = [*source, "--train", args.splits["train"], "--val", args.splits["test"],
              "--image-size", str(cfg.image_size), "--pooling", "adaptive", "--epochs", str(epochs),
              "--milestones", *map(str, milestones), "--batch-size", str(args.linear_batch),
              "--seed", str(cfg.seed), "--resume", "none", "--log-every", "0",
              *(["--workers", str(cfg.workers)] if cfg.workers >= 0 else [])]
    out = {}
    for protocol in ("lastlayer", "multilayer"):
        result = linear.main([*common, "--protocol", protocol,
                              "--out-dir", os.path.join(out_dir, f"linear_{protocol}")])
        prefix = "linear_last" if protocol == "lastlayer" else "linear_multi"
        out.update({f"{prefix}_{stage}": acc["top1"] for stage, acc in result.items() if stage != "images"})
    return out


def region_top1(args, cfg, backbone) -> dict:
    """The region probe's figures of ``backbone`` (pooled by the run's own RoI settings)."""
    import torch

    from maskco.evaluate.region import region_probe

    result = region_probe(backbone, args.probe, cfg.image_size, torch.device("cpu"), batch_size=cfg.batch_size,
                          sampling_ratio=cfg.roi_sampling_ratio, output_size=cfg.roi_output_size)
    return {key: value for key, value in result.items() if key in METRICS}


def localise_top1(args, cfg, checkpoint: str | None = None) -> dict:
    """Localisation accuracy on the test split: ``checkpoint``'s encoders, or (None) one random network of
    ``cfg``'s shape as both encoders; the same views, boxes and masks for every method (seeded by cfg.seed)."""
    from maskco.evaluate import localise

    data = [f"--data={args.splits['test']}", "--workers=0", f"--batch_size={min(cfg.batch_size, args.test_images)}",
            "--virtual_gpus=1"]  # evaluation mode: no BatchNorm groups
    if checkpoint:
        cfg, encoder_q, encoder_k = localise.load_encoders(checkpoint, data)
    else:
        cfg = build_config([args.config, *_shape_args(cfg, cfg.seed), *data])
        encoder_q, encoder_k = localise.encoder_pair(cfg)
    result = localise.localise(cfg, encoder_q, encoder_k, LOCALISE_IMAGES, workers=0)
    return {"localise_top1": result["localise_top1"], "localise_chance": result["chance"]}


def shape_of(cfg) -> str:
    init = "" if cfg.init == "torchvision" else f", {cfg.init} init"  # torchvision's: the labels of earlier runs
    return f"{cfg.arch} {cfg.stem} stem x{cfg.width:g}, {cfg.image_size} px{init}"


def random_init_row(args, cfg) -> dict:
    """Random init of ``cfg``'s architecture, evaluated as every trained backbone is."""
    import torch

    from maskco.evaluate import knn
    from maskco.export import random_backbone

    began = time.time()
    out_dir = os.path.join(args.out_dir, f"random_init-{cfg.arch}-{cfg.stem}-{cfg.width:g}-{cfg.image_size}-{cfg.init}")
    os.makedirs(out_dir, exist_ok=True)
    shape = ["--arch", cfg.arch, "--stem", cfg.stem, "--width", str(cfg.width), "--init", cfg.init]
    record = knn.main(["--random-init", *shape, "--train", args.splits["train"], "--val", args.splits["test"],
                       "--image-size", str(cfg.image_size), "--batch-size", str(cfg.batch_size),
                       "--seed", str(cfg.seed), "--out", os.path.join(out_dir, "knn.json"),
                       *(["--workers", str(cfg.workers)] if cfg.workers >= 0 else [])])
    torch.manual_seed(cfg.seed)
    row = {"method": "random_init", "label": f"random init ({shape_of(cfg)})", "seed": cfg.seed, "steps": 0,
           "knn_curve": [], "knn_top1": record["knn_top1"], "knn_top1_k20": record["knn_top1_k20"],
           **region_top1(args, cfg, random_backbone(cfg.arch, cfg.stem, cfg.width, cfg.init)),
           **localise_top1(args, cfg)}
    row.update(linear_top1(args, cfg, ["--random-init", *shape], out_dir))
    return {**row, "seconds": round(time.time() - began, 1)}


def variant_row(args, variant: str, seed: int) -> dict:
    from maskco import supervised, train
    from maskco.export import load_backbone

    argv = trainer_args(args, variant, seed)
    cfg = build_config(argv)
    out_dir = cfg.out_dir
    if os.path.exists(os.path.join(out_dir, "log.jsonl")):
        shutil.rmtree(out_dir)  # a previous quality run of this variant: the log appends, so start clean
    began = time.time()
    if variant == "supervised":
        result = supervised.train_supervised(cfg, classes=10, log_path=os.path.join(out_dir, "log.jsonl"))
        curve, exported, label = result["knn_curve"], result["exported"], f"supervised ({shape_of(cfg)})"
        finished = result
    else:
        code = train.main(argv)
        if code != 0:
            raise RuntimeError(f"pretraining {variant} stopped with exit code {code} (see {out_dir}/log.jsonl)")
        with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as handle:
            log = [json.loads(line) for line in handle]
        curve = [[r["step"], r["knn_top1"], r["knn_top1_k20"]] for r in log if "knn_top1" in r]
        finished = next(r for r in log if r.get("finished"))
        exported, label = finished["exported"], method_label(cfg)
    steps_per_epoch = finished["step"] / cfg.epochs
    row = {"method": variant, "label": label, "seed": seed, "steps": finished["step"],
           "epochs": cfg.epochs, "knn_curve": [[round(s / steps_per_epoch, 2), a, b] for s, a, b in curve],
           "knn_top1": curve[-1][1] if curve else None, "knn_top1_k20": curve[-1][2] if curve else None,
           "first_loss": finished["first_loss"], "last_loss": finished["last_loss"],
           "pretrain_seconds": round(time.time() - began, 1)}
    row.update(region_top1(args, cfg, load_backbone(exported)))
    if variant != "supervised":  # the supervised ceiling has no key encoder, head or MPH to localise with
        row.update(localise_top1(args, cfg, os.path.join(out_dir, "checkpoint_last.pt")))
    row.update(linear_top1(args, cfg, ["--checkpoint", exported], out_dir))
    return {**row, "seconds": round(time.time() - began, 1)}


def prepare_data(args) -> dict:
    """The splits, the probe's mosaics and (``--data mosaics`` / ``scenes``) the pretraining mosaics or scenes;
    one process only."""
    from pipelines import fmnist, mosaics, scenes

    source = args.fmnist_dir or fmnist.DEFAULT_DIR
    sizes = (args.pretrain_images, args.train_images, args.test_images)
    probe_dir, mosaic_dir = f"{args.data_dir}-probe", f"{args.data_dir}-mosaics"
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        raise ConfigError("make quality runs in one process (the trainer's virtual GPUs stand in for several)")
    splits = fmnist.write_splits(args.data_dir, source, *sizes, seed=0)
    args.probe = mosaics.write_probe_sets(probe_dir, source, *args.probe, seed=0)
    if args.data == "mosaics":
        splits["pretrain"] = mosaics.write_pretrain_mosaics(mosaic_dir, source, args.mosaics, seed=0)
    elif args.data == "scenes":  # the pretraining scenes of make transfer's folder layout (its train/test unused)
        splits["pretrain"] = scenes.write_scenes(f"{args.data_dir}-scenes", source, args.mosaics, seed=0)["pretrain"]
    return splits


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from maskco import quality_report  # torch loads here, after the arguments are good (--help needs none)
    from pipelines import DataError

    args.config = PRESETS[args.preset]["config"]
    try:
        cfg = build_config([args.config, *args.overrides])
        args.splits = prepare_data(args)
    except (ConfigError, DataError, ValueError, OSError) as error:
        print(f"maskco.quality: error: {error}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    results = os.path.join(args.out_dir, RESULTS)
    settings = {"settings": True, "preset": args.preset, "data": args.data, "variants": args.variants,
                "overrides": args.overrides, "epochs": cfg.epochs,
                "budget_steps": cfg.epochs * (args.pretrain_images // cfg.batch_size), "arch": shape_of(cfg),
                "image_size": cfg.image_size, "batch_size": cfg.batch_size, "virtual_gpus": cfg.virtual_gpus,
                "images": {"pretrain": args.pretrain_images, "train": args.train_images, "test": args.test_images},
                "linear_epochs": args.linear_epochs, "linear_batch": args.linear_batch, "seeds": args.seeds,
                "splits": args.splits, "probe": args.probe}
    rows, began = [], time.time()
    with open(results, "w", encoding="utf-8") as handle:  # one row per finished method, as it comes
        handle.write(json.dumps(settings) + "\n")
    shapes = {}  # random init: one row per architecture among the variants
    for variant in args.variants:
        if variant != "supervised":
            variant_cfg = build_config(trainer_args(args, variant, args.seeds[0]))
            shapes.setdefault(shape_of(variant_cfg), variant_cfg)
    jobs = [("random_init", shape) for shape in shapes] + [(variant, None) for variant in args.variants]
    for name, shape in jobs:
        if name == "random_init":
            row = quality_report.over_seeds([random_init_row(args, build_config(_shape_args(shapes[shape], seed)))
                                             for seed in args.seeds], METRICS)
        else:
            row = quality_report.over_seeds([variant_row(args, name, seed) for seed in args.seeds], METRICS)
        rows.append(row)
        with open(results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    figure = quality_report.plot(rows, settings, os.path.join(args.out_dir, FIGURE))
    print(quality_report.table(rows, settings, time.time() - began))
    print(f"results: {results}\nfigure: {figure}")
    return 0


def _shape_args(cfg, seed: int) -> list[str]:
    """A config of ``cfg``'s architecture and evaluation settings with ``seed``."""
    return [*[f"--{key}={getattr(cfg, key)}" for key in ("arch", "stem", "width", "init", "image_size", "batch_size",
                                                        "virtual_gpus", "workers", "roi_sampling_ratio",
                                                        "roi_output_size")], f"--seed={seed}"]


if __name__ == "__main__":
    sys.exit(main())
