"""``make quality``'s report (maskco/quality.py): the seeds' rows merged into one, the terminal table and the
kNN-curve figure."""
from __future__ import annotations

import statistics

STAGES = ("conv1", "res2", "res3", "res4", "res5")


def over_seeds(rows: list[dict], metrics: tuple) -> dict:
    """One row from a method's per-seed rows: every number the mean, the kNN spread, each seed's ``metrics``."""
    numbers = [key for key, value in rows[0].items() if isinstance(value, (int, float)) and key != "seed"]
    merged = {**rows[0], **{key: statistics.fmean(row[key] for row in rows) for key in numbers
                            if all(row.get(key) is not None for row in rows)}}
    merged["knn_curve"] = [[point[0], *[statistics.fmean(row["knn_curve"][i][j] for row in rows)
                                         for j in (1, 2)]] for i, point in enumerate(rows[0]["knn_curve"])]
    merged["seeds"] = [row.get("seed") for row in rows]
    points = [r["knn_top1"] for r in rows if r.get("knn_top1") is not None]  # None: a run with no kNN point
    merged["knn_top1_spread"] = max(points) - min(points) if points else None
    merged["per_seed"] = [{key: row.get(key) for key in ("seed", *metrics)} for row in rows]
    merged.pop("seed", None)
    return merged


def _cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(rows: list[dict], settings: dict, seconds: float) -> str:
    """One line per method: kNN (k=200 and k=20), region probe (RoI and cropped-item global), localisation
    accuracy (the masked box's similarity peak inside its positive box), linear
    last-layer and multi-layer per stage (top-1 %), the kNN spread over seeds, loss, minutes."""
    head = ["method", "kNN", "kNN k20", "region", "region glob", "localise", "linear last",
            *[f"multi {s}" for s in STAGES], "seeds (spread)", "loss first->last", "min"]
    lines = [[row["label"], _cell(row.get("knn_top1")), _cell(row.get("knn_top1_k20")),
              _cell(row.get("region_knn_top1")), _cell(row.get("region_knn_top1_global")),
              _cell(row.get("localise_top1")), _cell(row.get("linear_last_res5")),
              *[_cell(row.get(f"linear_multi_{s}")) for s in STAGES],
              f"{len(row.get('seeds', [0]))} ({row.get('knn_top1_spread') or 0:.1f})",
              f"{row['first_loss']:.2f}->{row['last_loss']:.2f}" if row.get("first_loss") is not None else "-",
              f"{row['seconds'] / 60:.1f}"] for row in rows]
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    title = (f"top-1 % on {settings['images']['test']} Fashion-MNIST test images (kNN bank: "
             f"{settings['images']['train']} train images); {settings['epochs']} epochs of "
             f"{settings['images']['pretrain']} {settings['data']} images, batch {settings['batch_size']} as "
             f"{settings['virtual_gpus']} virtual GPUs ({settings['arch']}); {seconds / 60:.1f} min in all")
    curves = [f"  kNN curve {row['label']} (epoch: k200 / k20): "
              + ", ".join(f"{e:g}: {a:.1f} / {b:.1f}" for e, a, b in row["knn_curve"])
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
            epochs, values, _ = zip(*row["knn_curve"])
            axes.plot(epochs, values, marker="o", label=f"{row['label']}: {values[-1]:.1f}")
    axes.set_xlim(left=0)
    axes.set_xlabel("pretraining epoch")
    axes.set_ylabel("kNN top-1 on the test split (%, k=200)")
    axes.set_title(f"Fashion-MNIST ({settings['data']}), {settings['arch']}: "
                   f"{settings['budget_steps']} steps of {settings['batch_size']} images", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path
