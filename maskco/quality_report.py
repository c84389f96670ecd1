"""The terminal table and the kNN-curve figure of ``make quality`` (maskco/quality.py)."""
from __future__ import annotations

STAGES = ("conv1", "res2", "res3", "res4", "res5")


def _cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(rows: list[dict], settings: dict, seconds: float) -> str:
    """One line per method: kNN, linear last-layer, multi-layer per stage (top-1 %), loss, minutes."""
    head = ["method", "kNN", "linear last", *[f"multi {s}" for s in STAGES], "loss first->last", "min"]
    lines = [[row["label"], _cell(row.get("knn_top1")), _cell(row.get("linear_last_res5")),
              *[_cell(row.get(f"linear_multi_{s}")) for s in STAGES],
              f"{row['first_loss']:.2f}->{row['last_loss']:.2f}" if "first_loss" in row else "-",
              f"{row['seconds'] / 60:.1f}"] for row in rows]
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    title = (f"top-1 % on {settings['images']['test']} Fashion-MNIST test images; {settings['budget_steps']} "
             f"pretraining steps of {settings['batch_size']} ({settings['arch']}, {settings['image_size']} px); "
             f"{seconds / 60:.1f} min in all")
    curves = [f"  kNN curve {row['label']}: " + ", ".join(f"{s}: {v:.1f}" for s, v in row["knn_curve"])
              for row in rows if row.get("knn_curve")]
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines), *curves])


def plot(rows: list[dict], settings: dict, path: str) -> str:
    """kNN top-1 against pretraining steps, one line per method, random init dashed; -> path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7.5, 4.5), dpi=120)
    for row in rows:
        if row["method"] == "random_init":
            axes.axhline(row["knn_top1"], color="gray", linestyle="--", label=f"{row['label']}: {row['knn_top1']:.1f}")
        elif row.get("knn_curve"):
            steps, values = zip(*row["knn_curve"])
            axes.plot(steps, values, marker="o", label=f"{row['label']}: {values[-1]:.1f}")
    axes.set_xlim(left=0)
    axes.set_xlabel("pretraining step")
    axes.set_ylabel("kNN top-1 on the test split (%)")
    axes.set_title(f"Fashion-MNIST, {settings['arch']} at {settings['image_size']} px: "
                   f"{settings['budget_steps']} steps of {settings['batch_size']} images", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path
