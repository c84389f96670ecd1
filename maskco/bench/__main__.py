"""``python -m maskco.bench``: where the time goes, against baselines measured in the same run.

Figures (img/s unless noted; median and spread over repeats, each after a warm-up, the device
synchronised around the timed region: ``maskco.bench.timing``):
  decode      decode-only ceiling: libjpeg-turbo (torchvision.io.decode_jpeg) on the same files and threads
  baseline    the reference MoCo v2 input pipeline (ImageFolder + PIL + two-crop MoCo v2 transforms)
  loader      each backend's Batch (two uint8 views + windows) on the device
  ready       loader + boxes + photometric augmentation + masking + normalisation (what the model eats)
  step        train step on synthetic ready inputs: maskco and mocov2, with and without the MPH; and the
              whole step after the loader (ready inputs + step) eager, compiled and graph-captured (--modes)
  e2e         real data, full step, per backend, with inputs one step ahead (prefetch) off and on; and the
              fraction of the time spent waiting for data
  roi_pool    fused vs reference, forward + backward: latency in ms per call (maskco.bench.micro)
The most wanted figures run first (step, then each backend, then the baselines), and each is written to
out_dir/bench.jsonl (or --jsonl) and printed as a JSON line the moment it is measured, so a run cut short
keeps what it measured; at the end a table on the terminal, the targets and a chart out_dir/bench.png.
The step's flags are the trainer's (TF32, cuDNN autotuning: maskco.build), so the two share compiled code;
``--compile-only`` compiles what a run would, untimed, to fill that cache ahead (scripts/gpu_plan.py).
A graph-captured figure that skipped CUDA graphs or recorded none fails the run (exit 3; bench.capture).
The package: timing (the one timing primitive), baselines (decode ceiling, MoCo v2 loader), figures
(loader, ready, step, e2e), capture (were CUDA graphs replayed), micro (RoI pool and loss), report
(environment, JSON lines, table, targets), chart.
"""
from __future__ import annotations


import json
import os
import sys
from typing import TYPE_CHECKING

from maskco import cli
from maskco.config import MOCOV2, build_config

if TYPE_CHECKING:  # torch and the figures load where they are used: --help answers without them
    from maskco.bench.report import Rows


def main(argv=None) -> int:
    args, device = _options(argv)
    from maskco.bench.figures import compile_figures, step_figures
    from maskco.bench.report import Rows, environment

    cfg = build_config([args.config] if args.config else [], base=dict(
        arch=args.arch, batch_size=args.batch_size, image_size=args.image_size,
        box_min_size=min(16.0, args.image_size / 8), workers=args.threads))
    env = {**environment(device, args.threads), "arch": cfg.arch, "batch_size": cfg.batch_size,
           "image_size": cfg.image_size, "config": args.config or "defaults"}  # what the step figures ran
    print(json.dumps(env))
    rows = Rows(args.jsonl or os.path.join(args.out_dir, "bench.jsonl"), env)
    if args.compile_only:
        rows.add(compile_figures(cfg, device, [args.e2e_mode] if args.compile_only == "prefetch" else args.modes,
                                 args.compile_backend, prefetched=args.compile_only == "prefetch"))
        return _captured(rows.rows)
    # ---- data
    root = args.data
    if not root:
        from pipelines.sample_data import make_sample_data

        root = make_sample_data(os.path.join("data", f"bench{args.images}"), num_images=args.images)
    # ---- figures, the most wanted first: step, each backend, the baselines
    if "step" not in args.skip:
        rows.add(step_figures(cfg, device, args.steps, args.repeats, args.modes, args.compile_backend,
                              variants="variants" not in args.skip, mocov2_queue=args.mocov2_queue))
    _backends(rows, args, cfg, device, root)
    _baselines(rows, args, device, root)
    # ---- report
    return _finish(rows, args.out_dir, env)


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m maskco.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="all", help="all | torch | ffcv | dali | dali-cpu (comma list)")
    parser.add_argument("--data", default="", help="ImageFolder root (default: a generated benchmark set)")
    parser.add_argument("--ffcv-data", default="", help=".beton for the ffcv backend (default: written from --data)")
    parser.add_argument("--images", type=int, default=1000, help="size of the generated benchmark set")
    parser.add_argument("--config", default="", help="a preset for the model (default: ResNet-50 defaults)")
    parser.add_argument("--arch", default="", help="default: resnet50 on a GPU, resnet18 on a CPU (where a "
                        "ResNet-50 step takes tens of seconds)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, default=0,
                        help="batches per timed loader repeat (0: 8 x threads, so that the batches a loader "
                             "prefetched before the clock started - about 2 per worker - weigh little)")
    parser.add_argument("--steps", type=int, default=0, help="steps per timed step repeat (0: 10 on a GPU, 1 on a CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default="", help="the step's execution modes to time, comma list of eager, "
                        "compiled, graphs (graph-captured: CUDA only); default: all three on a GPU, eager and "
                        "compiled on a CPU")
    parser.add_argument("--e2e-mode", default="", help="the step's mode in the end-to-end figures (default: the "
                        "last of --modes)")
    parser.add_argument("--compile-only", default="", choices=["", "steps", "prefetch"],
                        help="compile (and capture) and time nothing: each mode's whole step (steps), or the "
                             "Prefetcher's pair of graphs (prefetch); fills the compile cache for a later run")
    parser.add_argument("--hw-decoder-load", type=float, default=0.65, help="dali: share of JPEGs sent to the "
                        "hardware JPEG decoder (0.65: DALI's A100-era default; try 0.9 on an H100)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled "
                        "modes (aot_eager: no code generation, for a quick check)")
    parser.add_argument("--mocov2-queue", type=int, default=MOCOV2["queue_size"],
                        help="the MoCo v2 step rows' queue (default: MoCo v2's 65,536; make quality's CPU "
                             "preset: 4096)")
    parser.add_argument("--skip", default="", help="comma list of figures to skip: decode, baseline, loader, step, "
                        "e2e, roi, variants (the MaskCo / MoCo v2 step pairs)")
    parser.add_argument("--out-dir", default="runs/bench")
    parser.add_argument("--jsonl", default="", help="where the rows go as measured (default: out_dir/bench.jsonl)")
    return parser


def _options(argv) -> tuple:
    """(args, device): the options with the device's defaults filled in (batches, arch, steps, modes, e2e_mode)
    and skip as a set; a mode the device cannot run is a usage error (exit 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    import torch  # after the arguments are good (--help, a usage error: none loaded)

    from maskco.bench.figures import MODES

    args.batches = args.batches or max(8, 8 * args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.skip = set(filter(None, args.skip.split(",")))
    args.modes = [m for m in (args.modes or ("eager,compiled,graphs" if device.type == "cuda" else "eager,compiled"))
                  .split(",") if m]
    args.e2e_mode = args.e2e_mode or args.modes[-1]
    bad = [m for m in args.modes + [args.e2e_mode] if m not in MODES or (m == "graphs" and device.type != "cuda")]
    if bad:
        parser.error(f"--modes: {', '.join(bad)} cannot run here (eager, compiled; graphs needs CUDA)")
    args.arch = args.arch or ("resnet50" if device.type == "cuda" else "resnet18")
    args.steps = args.steps or (10 if device.type == "cuda" else 1)
    return args, device


def _backends(rows: Rows, args, cfg, device, root: str) -> None:
    """Each wanted backend's loader, ready and end-to-end figures, or a row saying why it was skipped."""
    import pipelines
    from maskco.bench.figures import backend_figures

    wanted = list(pipelines.BACKENDS) if args.backend == "all" else args.backend.split(",")
    available = pipelines.available_backends()
    for backend in wanted:
        if available.get(backend, "unknown backend"):
            rows.add([{"figure": "skipped", "name": backend, "reason": available.get(backend, "unknown backend")}])
            continue
        if backend == "dali" and device.type != "cuda":
            rows.add([{"figure": "skipped", "name": backend,
                       "reason": "no CUDA device (dali-cpu runs DALI on the CPU)"}])
            continue
        source = root
        if backend == "ffcv":
            source = args.ffcv_data or _beton(root, args.out_dir)
        if "loader" not in args.skip:
            # on a GPU the loader must outrun the step for many batches; on a CPU the step dominates
            e2e_batches = 0 if "e2e" in args.skip else (args.batches if device.type == "cuda" else args.steps)
            options = {"hw_decoder_load": args.hw_decoder_load} if backend == "dali" else {}
            rows.add(backend_figures(backend, source, cfg, device, args.threads, args.batches, e2e_batches,
                                     mode=args.e2e_mode, compile_backend=args.compile_backend, **options))


def _baselines(rows: Rows, args, device, root: str) -> None:
    """The decode ceiling, the reference MoCo v2 loader and the RoI pool / loss micro-benchmarks."""
    from pipelines.sources import list_images
    from maskco.bench import micro
    from maskco.bench.baselines import baseline_loader, decode_ceiling

    paths = list_images(root).paths
    if "decode" not in args.skip:
        rows.add([{"figure": "decode", "name": "decode", **decode_ceiling(paths, args.threads, device, args.repeats)}])
    if "baseline" not in args.skip:
        rows.add([{"figure": "baseline", "name": "baseline",
                   **baseline_loader(root, args.batch_size, args.image_size, args.threads, device, args.batches)}])
    if "roi" not in args.skip:
        rows.add([{"figure": "micro", "name": f"{r['group']} {r['impl']}", **r}  # latencies: ms per call, no rate
                  for r in micro.run(device, None if device.type == "cpu" else 20)])


def _finish(rows: Rows, out_dir: str, env: dict) -> int:
    """The table, the chart, the skipped figures and the targets; then the exit code (_captured)."""
    from maskco.bench.report import report, targets

    measured = [r for r in rows.rows if r["figure"] != "skipped"]
    report(measured, out_dir, env)
    for row in rows.rows:
        if row["figure"] == "skipped":
            print(f"skipped {row['name']}: {row['reason']}")
    for line in targets(measured):
        print(line)
    rows.add([{"figure": "targets", "lines": targets(measured)}])
    return _captured(rows.rows)


def _captured(rows: list[dict]) -> int:
    """0, or 3 after saying loudly which graph-captured figure did not replay CUDA graphs."""
    from maskco.bench import capture

    problems = capture.check(rows)
    for line in problems:
        print(f"ERROR: {line}", file=sys.stderr, flush=True)
    return 3 if problems else 0


def _beton(root: str, out_dir: str) -> str:
    """Write (once) a .beton of the benchmark images for the ffcv backend."""
    from pipelines import ffcv_writer

    path = os.path.join(out_dir, os.path.basename(os.path.normpath(root)) + ".beton")
    if not os.path.exists(path):
        ffcv_writer.write_beton(root, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
