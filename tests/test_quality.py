"""make quality end to end on a tiny synthetic Fashion-MNIST: every row and the figure; no accuracy asserted."""
from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import torch
import pytest

from maskco import quality
from maskco.config import build_config
from pipelines import fmnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch=resnet18", "--width=0.25", "--batch_size=8", "--virtual_gpus=2", "--epochs=2", "--mph_width=32",
        "--mph_heads=2", "--head_hidden=64", "--head_dim=32", "--num_negatives=4", "--workers=0", "--log_every=1"]


def write_idx(path: str, array: np.ndarray) -> None:
    """An IDX file as the Fashion-MNIST release writes it: magic (0, 0, 0x08, ndim), big-endian dims, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> str:
    """60 train and 30 test 28 x 28 images: a bright square whose position and size depend on the class."""
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, count in (("train", 60), ("t10k", 30)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 40, size=(count, 28, 28))
        for image, label in zip(images, labels):
            image[2 + label: 12 + label, 4 + label: 14 + 2 * (label % 3)] = 220
        write_idx(str(folder / fmnist.FILES[split][0]), images)
        write_idx(str(folder / fmnist.FILES[split][1]), labels)
    return str(folder)


def test_idx_reader_round_trips(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(str(tmp_path / "x.gz"), array)
    assert np.array_equal(fmnist.read_idx(str(tmp_path / "x.gz")), array)


def test_splits_are_deterministic_disjoint_and_reused(tmp_path, fake_fmnist):
    folders = fmnist.write_splits(str(tmp_path / "a"), fake_fmnist, pretrain=20, train=20, test=10)
    names = {split: sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
             for split, folder in folders.items()}
    assert len(names["pretrain"]) == 20 and len(names["test"]) == 10
    assert sorted(os.listdir(folders["train"])) == list(fmnist.CLASSES)  # 2 per class, labels in order
    assert {os.path.basename(n) for n in names["pretrain"]}.isdisjoint(os.path.basename(n) for n in names["train"])
    # the labelled splits are the first images in the release's order (the reference kNN monitor's)
    assert sorted(os.path.basename(n) for n in names["test"]) == [f"t10k_{i:05d}.png" for i in range(10)]
    pretrained = {int(os.path.basename(n)[6:11]) for n in names["pretrain"]}
    assert sorted(int(os.path.basename(n)[6:11]) for n in names["train"]) == \
        [i for i in range(60) if i not in pretrained][:20]
    again = fmnist.write_splits(str(tmp_path / "b"), fake_fmnist, pretrain=20, train=20, test=10)
    for split in folders:
        for name in names[split]:
            with open(os.path.join(folders[split], name), "rb") as a, open(os.path.join(again[split], name), "rb") as b:
                assert a.read() == b.read()
    marker = os.path.join(tmp_path, "a", fmnist.MARKER)
    stamp = os.stat(marker).st_mtime_ns
    fmnist.write_splits(str(tmp_path / "a"), fake_fmnist, pretrain=20, train=20, test=10)
    assert os.stat(marker).st_mtime_ns == stamp  # reused, not rewritten


def test_a_symlinked_splits_folder_is_rewritten_where_it_points(tmp_path, fake_fmnist):
    """A data folder linked from elsewhere (a worktree sharing one copy) with older settings is rebuilt in
    place: the link stays a link to the same folder, which now holds the new splits."""
    real, link = tmp_path / "real", tmp_path / "link"
    fmnist.write_splits(str(real), fake_fmnist, pretrain=20, train=20, test=10)
    os.symlink(real, link)
    folders = fmnist.write_splits(str(link), fake_fmnist, pretrain=10, train=20, test=10)
    assert os.path.islink(link) and os.readlink(link) == str(real)
    assert fmnist.read_marker(str(real))["pretrain"] == 10
    assert sum(len(files) for _, _, files in os.walk(folders["pretrain"])) == 10
    assert folders["pretrain"].startswith(str(real))
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]  # no staging left behind


def test_missing_package_is_one_line_exit_2(tmp_path):
    command = [sys.executable, "-m", "maskco.quality", f"--fmnist-dir={tmp_path / 'none'}",
               f"--data-dir={tmp_path / 'data'}", f"--out-dir={tmp_path / 'out'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert fmnist.INSTALL in result.stderr


def _quality(tmp_path, fake_fmnist, *extra) -> list[dict]:
    out_dir = tmp_path / "out"
    code = quality.main([f"--fmnist-dir={fake_fmnist}", f"--data-dir={tmp_path / 'data'}", f"--out-dir={out_dir}",
                         "--pretrain-images=16", "--train-images=20", "--test-images=10", "--linear-epochs=1",
                         "--linear-batch=10", "--queue=16", "--probe-mosaics", "5", "3", *TINY, *extra])
    assert code == 0
    with open(out_dir / quality.FIGURE, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(out_dir / quality.RESULTS, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_quality_writes_every_row_and_the_figure(tmp_path, fake_fmnist):
    rows = _quality(tmp_path, fake_fmnist, "--variants=mocov2,maskco,supervised")
    assert rows[0]["settings"] and rows[0]["budget_steps"] == 4  # 2 epochs x 16 images / 8
    assert [row["method"] for row in rows[1:]] == ["random_init", "mocov2", "maskco", "supervised"]
    for row in rows[1:]:  # every arm, random init included, evaluated the same way
        stages = ("conv1", "res2", "res3", "res4", "res5")
        keys = ["knn_top1", "knn_top1_k20", "region_knn_top1", "region_knn_top1_k20", "region_knn_top1_global",
                "linear_last_res5", *[f"linear_multi_{s}" for s in stages]]
        assert all(0 <= row[key] <= 100 for key in keys), row
    for row in rows[2:]:  # a kNN point (k=200 and k=20) after every epoch
        assert row["steps"] == 4 and [epoch for epoch, _, _ in row["knn_curve"]] == [1, 2]
    assert rows[2]["label"].startswith("MoCo v2-like") and "queue_size=16" in rows[2]["label"]
    assert rows[4]["label"].startswith("supervised")
    assert "random init (resnet18 cifar stem x0.25, 32 px, pytorch init)" == rows[1]["label"]


def test_quality_seeds_give_the_mean_and_spread_and_one_random_init_per_architecture(tmp_path, fake_fmnist):
    rows = _quality(tmp_path, fake_fmnist, "--variants=mocov2,mocov2_96px,mocov2_torchvision_init", "--seeds=0,1",
                    "--linear-epochs=0", "--epochs=1")
    assert [row["method"] for row in rows[1:]] == ["random_init"] * 3 + ["mocov2", "mocov2_96px",
                                                                          "mocov2_torchvision_init"]
    assert "32 px, pytorch init" in rows[1]["label"] and "imagenet stem x0.25, 96 px, pytorch init" in rows[2]["label"]
    assert rows[3]["label"] == "random init (resnet18 cifar stem x0.25, 32 px)"  # torchvision's init: its own floor
    for row in rows[1:]:
        assert row["seeds"] == [0, 1] and len(row["per_seed"]) == 2
        values = [seed["knn_top1"] for seed in row["per_seed"]]
        assert row["knn_top1"] == pytest.approx(sum(values) / 2)
        assert row["knn_top1_spread"] == pytest.approx(max(values) - min(values))


def test_quality_on_mosaics(tmp_path, fake_fmnist):
    rows = _quality(tmp_path, fake_fmnist, "--data=mosaics", "--mosaics=16", "--variants=maskco,supervised",
                    "--linear-epochs=0", "--epochs=1")
    assert rows[0]["data"] == "mosaics" and rows[0]["splits"]["pretrain"].endswith("mosaics/pretrain")
    assert [row["method"] for row in rows[1:]] == ["random_init", "maskco"]  # no single-label ceiling


def test_supervised_classifier_is_the_runs_network_with_its_virtual_gpus():
    from maskco.config import build_config
    from maskco.model import GroupBatchNorm2d
    from maskco.supervised import build_classifier

    cfg = build_config(["quality_cpu"])  # 8 virtual GPUs of 32
    classifier = build_classifier(cfg, 10)
    norms = [m for m in classifier.modules() if isinstance(m, GroupBatchNorm2d)]
    assert norms and all(m.groups == 8 for m in norms)
    assert classifier[1].in_features == 128  # ResNet-18 at width 0.25
    assert classifier(torch.zeros(16, 3, 32, 32)).shape == (16, 10)


def test_a_subset_variant_keeps_the_steps_of_the_epochs_the_user_asked_for(tmp_path):
    from PIL import Image

    folder = tmp_path / "pretrain" / "0"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (28, 28)).save(folder / f"train_{i:05d}.png")
    for asked in (None, 1):  # the preset's 4 epochs, or --epochs=1 given to make quality
        args = quality.parse_args(["--variants=mocov2_3840", f"--out-dir={tmp_path}"]
                                  + ([f"--epochs={asked}"] if asked else []))
        args.config = quality.PRESETS["cpu"]["config"]
        args.splits = {"pretrain": str(tmp_path / "pretrain"), "train": "t", "test": "v"}
        cfg = build_config(quality.trainer_args(args, "mocov2_3840", 0))
        epochs = asked or 4  # 234 steps of 256 per epoch on 60,000 images: 15 per epoch on 3,840
        assert (cfg.epochs, cfg.knn_every) == (round(epochs * 234 / 15), round(epochs * 234 / 15) // epochs)
        assert cfg.data.endswith("mocov2_3840_images.txt")
