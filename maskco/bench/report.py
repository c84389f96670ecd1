"""The bench's output: the environment record, the JSON lines, the terminal table, the chart
(``chart.py``), and the speed targets (BENCHMARKS.md) as ratios of figures measured in the same run
(reported, never asserted)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch

from maskco.runlog import git_revision


def environment(device, threads: int) -> dict:
    """What produced the figures: machine, card, driver, torch / torchvision / DALI versions, commit."""
    import torchvision

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    capability = ".".join(map(str, torch.cuda.get_device_capability(device))) if gpu else None
    revision = git_revision()  # a copy of the tree without .git: MASKCO_COMMIT says (gpu_plan.py --commit)
    return {"machine": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": threads, "gpu": gpu, "capability": capability, "driver": gpu and _driver(),
            "cuda": torch.version.cuda, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "dali": _version("nvidia-dali-cuda130", "nvidia-dali-cuda120"), "python": platform.python_version(),
            "git": os.environ.get("MASKCO_COMMIT", revision) if revision == "unknown" else revision,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(*names):
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


class Rows:
    """The bench's JSON lines: each row written (with the environment) and flushed the moment it is
    measured, so a run cut short keeps what it measured; also printed, one JSON line each."""

    def __init__(self, path: str, env: dict, tags: tuple = ("arch", "batch_size", "image_size")):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self.env, self.rows = path, env, []
        self.tags = {key: env[key] for key in tags if key in env}  # printed with every row: what it measured

    def add(self, rows) -> None:
        for row in rows:
            self.rows.append(row)
            line = json.dumps({**self.env, **row})
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
            print(json.dumps({**row, **self.tags}), flush=True)


def value(row: dict) -> tuple[float, str]:
    """(median, unit) of a measured row: images per second, or a latency in ms per call."""
    return (row["ms_per_call"], "ms/call") if "ms_per_call" in row else (row["img_per_s"], "img/s")


def report(rows: list[dict], out_dir: str, env: dict) -> None:
    from maskco.bench.chart import chart

    os.makedirs(out_dir, exist_ok=True)
    ceiling = next((r for r in rows if r["figure"] == "decode"), None)
    baseline = next((r for r in rows if r["figure"] == "baseline"), None)
    eager_step = mode_rows(rows).get("eager")
    print(f"\n{'figure':<16}{'name':<52}{'median':>10}{'min-max':>20}  {'unit':<8} vs")
    for row in rows:
        reference = {"loader": ceiling, "ready": baseline}.get(row["figure"])
        if row.get("mode", "eager") != "eager" and row["figure"] == "step":
            reference = eager_step  # compiled / graph-captured against eager, measured in this run
        ratio = f"{row['img_per_s'] / reference['img_per_s']:.2f}x {reference['name']}" if reference else ""
        if "data_wait" in row:
            ratio += f"waiting for data {row['data_wait']:.0%}"
        if "speedup" in row:
            ratio += f"{row['speedup']:.1f}x faster than the reference"
        median, unit = value(row)
        spread = f"{row['min']:.1f}-{row['max']:.1f}"
        print(f"{row['figure']:<16}{row['name']:<52}{median:>10.1f}{spread:>20}  {unit:<8} {ratio}")
    chart(rows, os.path.join(out_dir, "bench.png"), env)


# each MaskCo step row and the same-network MoCo row it is compared with
STEP_PAIRS = (("MaskCo", "MoCo v2-like (mph=attn)"), ("MaskCo (mph=none)", "MoCo v2"))
METHOD_ONLY = "boxes+mask+roi_pool+logits"  # what MaskCo adds to a MoCo step, timed alone


def mode_rows(rows: list[dict]) -> dict:
    """mode -> the measured row of the whole step after the loader in that mode (eager, compiled, graphs)."""
    return {r["mode"]: r for r in rows if r["figure"] == "step" and "mode" in r and "img_per_s" in r}


def target_rates(rows: list[dict]) -> dict:
    """(figure, name) -> the img/s that bar must reach to meet its target, from figures of this run."""
    get = {(r["figure"], r["name"]): r["img_per_s"] for r in rows if "img_per_s" in r}
    wanted = {}
    if ("baseline", "baseline") in get:
        for (figure, name) in get:
            if figure == "ready":
                wanted[figure, name] = 3 * get["baseline", "baseline"]  # ready inputs >= 3x the baseline loader
    if ("decode", "decode") in get:
        for (figure, name) in get:
            if figure == "loader":
                wanted[figure, name] = 0.5 * get["decode", "decode"]  # loader >= 50 % of the decode ceiling
    for maskco_name, moco_name in STEP_PAIRS:
        if ("step", moco_name) in get:
            wanted["step", maskco_name] = get["step", moco_name] / 1.15  # step time <= 1.15x MoCo's
    if ("step", "MaskCo") in get:
        wanted["method_only", METHOD_ONLY] = get["step", "MaskCo"] / 0.03  # <= 3 % of a step's time
    steps = mode_rows(rows)
    for row in rows:
        if row["figure"] == "e2e" and row.get("mode", "eager") in steps:  # GPU target: never wait for data
            wanted["e2e", row["name"]] = 0.95 * steps[row.get("mode", "eager")]["img_per_s"]
    return wanted


def targets(rows: list[dict]) -> list[str]:
    """The speed targets, as ratios of figures measured in this run (reported, never asserted)."""
    get = {(r["figure"], r["name"]): r["img_per_s"] for r in rows if "img_per_s" in r}
    lines = []
    best_ready = max((v for (f, _), v in get.items() if f == "ready"), default=None)
    best_loader = max((v for (f, _), v in get.items() if f == "loader"), default=None)
    if best_ready and ("baseline", "baseline") in get:
        ratio = best_ready / get["baseline", "baseline"]
        lines.append(f"best ready inputs / baseline loader = {ratio:.2f}x (target >= 3x)")
    if best_loader and ("decode", "decode") in get:
        lines.append(f"best loader / decode ceiling = {best_loader / get['decode', 'decode']:.0%} (target >= 50%)")
    for maskco_name, moco_name in STEP_PAIRS:
        maskco, mocov2 = get.get(("step", maskco_name)), get.get(("step", moco_name))
        if maskco and mocov2:
            lines.append(f"{maskco_name} step time / {moco_name} step time = {mocov2 / maskco:.3f}x (target <= 1.15x)")
    step = get.get(("step", "MaskCo"))
    ready = get.get(("ready_synthetic", "boxes+augment+mask"))
    method = get.get(("method_only", METHOD_ONLY))
    if ready and step:
        lines.append(f"boxes+augment+mask time / maskco step time = {step / ready:.1%}")
    if method and step:
        lines.append(f"{METHOD_ONLY} time / maskco step time = {step / method:.1%} (target <= 3%)")
    modes = mode_rows(rows)
    for mode, row in modes.items():
        if mode != "eager" and "eager" in modes:
            lines.append(f"{row['name']} / eager = {row['img_per_s'] / modes['eager']['img_per_s']:.2f}x "
                         f"({row['img_per_s']:.0f} img/s; GPU target >= 2,000 at 32 img/GPU, ResNet-50)")
    for row in rows:
        if row["figure"] == "e2e" and "img_per_s" in row:
            reference = modes.get(row.get("mode", "eager"))
            if reference:
                lines.append(f"e2e {row['name']} / (ready inputs + step on a synthetic batch, {reference['name']}) = "
                             f"{row['img_per_s'] / reference['img_per_s']:.0%} (GPU target >= 95%)")
    return lines
