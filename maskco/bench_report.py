"""The bench's output: the environment record, the terminal table, the bar chart, and the targets of
the benchmark issue as ratios of figures measured in the same run (reported, never asserted)."""
from __future__ import annotations

import json
import os
import platform
import time

import torch

from maskco.runlog import git_revision


def environment(device, threads: int) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"machine": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": threads, "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "git": git_revision(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def report(rows: list[dict], out_dir: str, env: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.jsonl"), "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({**env, **row}) + "\n")
    ceiling = next((r for r in rows if r["figure"] == "decode"), None)
    baseline = next((r for r in rows if r["figure"] == "baseline"), None)
    print(f"\n{'figure':<16}{'name':<28}{'img/s':>10}{'min-max':>18}   ratio")
    for row in rows:
        reference = {"loader": ceiling, "ready": baseline}.get(row["figure"])
        ratio = f"{row['img_per_s'] / reference['img_per_s']:.2f}x {reference['figure']}" if reference else ""
        if "data_wait" in row:
            ratio += f"waiting for data {row['data_wait']:.0%}"
        spread = f"{row['min']:.1f}-{row['max']:.1f}"
        print(f"{row['figure']:<16}{row['name']:<28}{row['img_per_s']:>10.1f}{spread:>18}   {ratio}")
    _chart(rows, os.path.join(out_dir, "bench.png"), env)


def _chart(rows: list[dict], path: str, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['figure']}: {r['name']}" for r in rows]
    values = [r["img_per_s"] for r in rows]
    figure, axis = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    axis.barh(labels[::-1], values[::-1], color="#3b7dd8")
    axis.set_xlabel("images / s (median)")
    axis.set_title(f"maskco bench — {env['gpu'] or env['cpu']} ({env['threads']} threads), {env['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, as ratios of figures measured in this run (reported, never asserted)."""
    get = {(r["figure"], r["name"]): r["img_per_s"] for r in rows}
    lines = []
    best_ready = max((v for (f, _), v in get.items() if f == "ready"), default=None)
    best_loader = max((v for (f, _), v in get.items() if f == "loader"), default=None)
    if best_ready and ("baseline", "baseline") in get:
        lines.append(f"best ready inputs / baseline loader = {best_ready / get['baseline', 'baseline']:.2f}x (target >= 3x)")
    if best_loader and ("decode", "decode") in get:
        lines.append(f"best loader / decode ceiling = {best_loader / get['decode', 'decode']:.0%} (target >= 50%)")
    for maskco_name, moco_name in (("MaskCo", "MoCo v2-like (mph=attn)"), ("MaskCo (mph=none)", "MoCo v2")):
        maskco, mocov2 = get.get(("step", maskco_name)), get.get(("step", moco_name))
        if maskco and mocov2:
            lines.append(f"{maskco_name} step time / {moco_name} step time = {mocov2 / maskco:.3f}x (target <= 1.15x)")
    step = get.get(("step", "MaskCo"))
    ready = get.get(("ready_synthetic", "boxes+augment+mask"))
    method = get.get(("method_only", "boxes+mask+roi_pool+logits"))
    if ready and step:
        lines.append(f"boxes+augment+mask time / maskco step time = {step / ready:.1%}")
    if method and step:
        lines.append(f"boxes+mask+roi_pool+logits time / maskco step time = {step / method:.1%} (target <= 3%)")
    for (figure, name), value in get.items():
        if figure == "e2e" and ("step", "ready+maskco") in get:
            lines.append(f"e2e {name} / (ready inputs + step on a synthetic batch) = "
                         f"{value / get['step', 'ready+maskco']:.0%} (GPU target >= 95%)")
    return lines
