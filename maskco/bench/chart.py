"""``bench.png``: one panel per kind of figure, each with its own unit and scale.

- input pipeline: each backend's loader and ready inputs against the decode ceiling and the MoCo v2
  baseline loader, with the target lines (loader >= 50 % of the ceiling, ready >= 3x the baseline);
- train step on synthetic ready inputs, MaskCo against MoCo v2 on the same machinery, and the
  input-side parts of a step alone, with a target mark on each bar that has one (MaskCo step time
  <= 1.15x MoCo's; the method's own work <= 3 % of a step);
- end to end on real data, each bar split into computing and waiting for data, against the
  synthetic step and its 95 % target;
- micro-benchmarks: latency in ms per call (lower is better), fused against the reference.
A panel's axis is logarithmic when its bars (and target marks) differ by more than 10x, except the
end-to-end panel, whose waiting share reads only on a linear axis; every bar carries its value.
"""
from __future__ import annotations

from maskco.bench.report import target_rates

REFERENCE, MASKCO, MOCO, WAIT, TARGET = "#9e9e9e", "#3b7dd8", "#e08a1e", "#d9534f", "#222222"
# figures whose target differs per bar: a mark on the bar (the bar must reach it), not a line
MARKED = {"step": "target: MaskCo step time <= 1.15x its MoCo row's (reach the mark)",
          "method_only": "target: <= 3% of a MaskCo step's time (reach the mark)"}


def _panels(rows: list[dict]) -> list[dict]:
    """The panels to draw (empty ones left out): title, unit, bars as (label, row, colour)."""
    by = {}
    for row in rows:
        by.setdefault(row["figure"], []).append(row)
    inputs = ([("decode ceiling (libjpeg-turbo)", r, REFERENCE) for r in by.get("decode", [])]
              + [("MoCo v2 loader (baseline)", r, REFERENCE) for r in by.get("baseline", [])])
    for loader in by.get("loader", []):
        inputs.append((f"{loader['name']}: loader", loader, MASKCO))
        inputs += [(f"{r['name']}: ready inputs", r, MASKCO) for r in by.get("ready", [])
                   if r["name"] == loader["name"]]
    steps = [(r["name"], r, MOCO if r["name"].startswith("MoCo") else MASKCO) for r in by.get("step", [])
             if "mode" not in r]
    modes = [(f"{r['name']} (synthetic batch)", r, MASKCO if r["mode"] != "eager" else REFERENCE)
             for r in by.get("step", []) if "mode" in r]
    parts = [(r["name"], r, REFERENCE) for r in by.get("ready_synthetic", []) + by.get("method_only", [])]
    e2e = [(f"{r['name']}: real data", r, MASKCO) for r in by.get("e2e", [])]
    if e2e:
        e2e += [(f"synthetic batch ({r['name']})", r, REFERENCE) for r in by.get("step", []) if "mode" in r]
    micro = [(r["name"].replace("contrastive_loss", "loss").replace("sampling_ratio", "sr"), r,
              REFERENCE if r["impl"] == "reference" else MASKCO) for r in by.get("micro", [])]
    panels = [
        {"title": "Input pipeline (images / s, higher is better)", "bars": inputs, "key": "img_per_s"},
        {"title": "Train step on synthetic ready inputs (images / s; orange: MoCo v2 on the same machinery)",
         "bars": steps, "key": "img_per_s"},
        {"title": "The whole step after the loader: eager (grey), compiled, graph-captured (images / s)",
         "bars": modes, "key": "img_per_s"},
        {"title": "The input side of a MaskCo step, timed alone (images / s)", "bars": parts, "key": "img_per_s"},
        {"title": "End to end: loader + full step (images / s; red: share of time waiting for data)",
         "bars": e2e, "key": "img_per_s"},
        {"title": "Micro-benchmarks, forward + backward (ms per call, lower is better)", "bars": micro,
         "key": "ms_per_call"},
    ]
    return [panel for panel in panels if panel["bars"]]


def _draw_panel(axis, panel: dict, wanted: dict) -> None:
    bars, key = panel["bars"], panel["key"]
    values = [row[key] for _, row, _ in bars]
    ys = list(range(len(bars)))[::-1]  # first bar on top
    axis.barh(ys, values, color=[colour for *_, colour in bars], height=0.7)
    marks = [wanted[row["figure"], row["name"]] for _, row, _ in bars
             if row["figure"] in MARKED and (row["figure"], row["name"]) in wanted]
    span = values + marks
    # a share of a bar (the data wait) reads only on a linear axis
    log = max(span) > 10 * max(min(span), 1e-9) and not any("data_wait" in row for _, row, _ in bars)
    if log:
        axis.set_xscale("log")
    unit = "ms" if key == "ms_per_call" else "img/s"
    for y, (label, row, _) in zip(ys, bars):
        text = f"{row[key]:,.1f} {unit}" if row[key] < 100 else f"{row[key]:,.0f} {unit}"
        if "data_wait" in row:  # the waiting share, drawn over the end of the bar
            axis.barh(y, row[key] * row["data_wait"], left=row[key] * (1 - row["data_wait"]), color=WAIT, height=0.7)
            text += f", {row['data_wait']:.0%} waiting for data"
        if "speedup" in row:
            text += f" ({row['speedup']:.1f}x faster)"
        axis.text(row[key] * (1.08 if log else 1.0) + (0 if log else 0.01 * max(values)), y, " " + text,
                  va="center", fontsize=8)
        target = wanted.get((row["figure"], row["name"]))
        if target and row["figure"] in MARKED:
            axis.plot([target, target], [y - 0.42, y + 0.42], color=TARGET, linewidth=2)
    lines = {}  # one labelled vertical line per target shared by a kind of bar
    for (label, row, _) in bars:
        target = wanted.get((row["figure"], row["name"]))
        if target and row["figure"] not in MARKED:
            lines[row["figure"]] = target
    names = {"loader": "target: loader >= 50% of decode ceiling", "ready": "target: ready >= 3x baseline",
             "e2e": "target (GPU): e2e >= 95% of the synthetic step"}
    for (figure, target), style in zip(lines.items(), ("--", ":", "-.")):
        axis.axvline(target, color=TARGET, linestyle=style, linewidth=1, label=names[figure])
    marked = {row["figure"] for _, row, _ in bars
              if wanted.get((row["figure"], row["name"])) and row["figure"] in MARKED}
    for figure in sorted(marked):
        axis.plot([], [], color=TARGET, linewidth=2, label=MARKED[figure])
    if axis.get_legend_handles_labels()[0]:  # in the slot below the last bar (see _legend_rows)
        axis.legend(loc="lower right", fontsize=7, framealpha=0.9, ncol=3)
    axis.set_ylim(-0.6 - _legend_rows(panel, wanted), len(bars) - 0.4)
    axis.set_yticks(ys, [label for label, _, _ in bars], fontsize=8)
    axis.set_title(panel["title"] + (", log scale" if log else ""), fontsize=9, loc="left")
    low, high = (min(span) / 2, max(span) * 6) if log else (0, max(span) * 1.45)
    axis.set_xlim(low, max([high] + [t * 1.2 for t in lines.values()]))
    axis.grid(axis="x", alpha=0.3, which="both" if log else "major")


def _legend_rows(panel: dict, wanted: dict) -> float:
    """Bar rows kept free under a panel's bars for its legend (one line of target entries)."""
    return 1.0 if any((row["figure"], row["name"]) in wanted for _, row, _ in panel["bars"]) else 0.0


def chart(rows: list[dict], path: str, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(rows)
    if not panels:
        return
    wanted = target_rates(rows)
    heights = [len(panel["bars"]) + _legend_rows(panel, wanted) + 1.2 for panel in panels]
    figure, axes = plt.subplots(len(panels), 1, figsize=(11, 0.32 * sum(heights) + 1.2),
                                gridspec_kw={"height_ratios": heights}, squeeze=False, layout="constrained")
    for axis, panel in zip(axes[:, 0], panels):
        _draw_panel(axis, panel, wanted)
    where = env["gpu"] or f"{env['cpu']} CPU"
    figure.suptitle(f"maskco bench: {where}, {env['threads']} threads, torch {env['torch']}\n"
                    f"{env['date']}, git {env['git']} (medians over repeats; targets from this run's figures)",
                    fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)
