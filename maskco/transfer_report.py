"""``make transfer``'s rows merged over seeds, its table in the paper's shape, and its figure."""
from __future__ import annotations

import statistics

FIGURES = ("ap", "ap50", "ap75")
LABELS = {"random_init": "random init", "mocov2": "MoCo v2", "maskco": "MaskCo", "supervised": "supervised"}


def row(method: str, pretrain_data: str, per_seed: list[dict]) -> dict:
    """One result row: ``det_<figure>`` the mean over seeds, ``det_<figure>_spread`` max - min."""
    merged = {"method": method, "pretrain_data": pretrain_data, "seeds": [r["seed"] for r in per_seed],
              "pretrain_steps": per_seed[0]["pretrain_steps"]}
    for figure in FIGURES:
        values = [r[figure] for r in per_seed]
        merged[f"det_{figure}"] = round(statistics.fmean(values), 2)
        merged[f"det_{figure}_spread"] = round(max(values) - min(values), 2)
    merged["per_seed"] = per_seed
    return merged


def _cell(r: dict | None) -> str:
    if r is None:
        return f"{'-':>22}"
    spread = len(r["per_seed"]) > 1
    return " ".join(f"{r[f'det_{f}']:5.1f}" + (f"±{r[f'det_{f}_spread'] / 2:3.1f}" if spread else "")
                    for f in FIGURES).rjust(22 if not spread else 34)


def table(rows: list[dict], settings: dict, seconds: float) -> str:
    """Methods down, pretraining sets across (random init, which has none, in both), AP / AP50 / AP75."""
    sets = settings["pretrain_data"]
    by = {(r["method"], r["pretrain_data"]): r for r in rows}
    width = 34 if len(settings["seeds"]) > 1 else 22
    head = f"{'pretraining data':<16}" + "".join(f"{s:>{width}}" for s in sets)
    sub = f"{'method':<16}" + "".join(f"{'AP   AP50  AP75':>{width}}" for _ in sets)
    lines = [f"detection on the test scenes (pycocotools, Faster R-CNN C4), seeds {settings['seeds']}"
             + ("; mean ± half the spread" if len(settings["seeds"]) > 1 else ""), head, sub]
    for method in settings["methods"]:
        cells = [by.get((method, "none")) if method == "random_init" else by.get((method, s)) for s in sets]
        lines.append(f"{LABELS.get(method, method):<16}" + "".join(_cell(c) for c in cells))
    lines.append(f"{seconds / 60:.1f} min")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    """Bars of AP per method, one colour per pretraining set, the seeds' range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    methods = list(dict.fromkeys(r["method"] for r in rows))
    sets = list(dict.fromkeys(r["pretrain_data"] for r in rows))
    figure, axis = pyplot.subplots(figsize=(7, 4))
    width = 0.8 / len(sets)
    for k, data in enumerate(sets):
        for m, method in enumerate(methods):
            r = next((r for r in rows if r["method"] == method and r["pretrain_data"] == data), None)
            if r is None:
                continue
            values = [s["ap"] for s in r["per_seed"]]
            axis.bar(m + (k - (len(sets) - 1) / 2) * width, r["det_ap"], width, color=f"C{k}",
                     yerr=[[r["det_ap"] - min(values)], [max(values) - r["det_ap"]]], capsize=3, label=data)
    axis.set_xticks(range(len(methods)), [LABELS.get(m, m) for m in methods])
    axis.set_ylabel("detection AP (test scenes)")
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), title="pretraining data")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path
