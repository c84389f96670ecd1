"""pipelines.scenes: tight boxes, bounded overlap, disjoint splits, deterministic COCO files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipelines import fmnist, scenes
from test_quality import write_idx


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> str:
    """300 train and 60 test items: a garment-like blob of class-dependent shape on a black 28 x 28 ground."""
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, count in (("train", 300), ("t10k", 60)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 20, size=(count, 28, 28))
        for image, label in zip(images, labels):
            image[3 + label: 25, 2 + (label % 4): 26 - (label % 3)] = rng.integers(60, 255)
        write_idx(str(folder / fmnist.FILES[split][0]), images)
        write_idx(str(folder / fmnist.FILES[split][1]), labels)
    return str(folder)


def test_every_box_is_tight_around_its_garments_visible_pixels(fake_fmnist):
    images, labels = fmnist.load_split(fake_fmnist, "train")
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(40):
        picked = rng.choice(len(images), size=6, replace=False)
        image, boxes, kept, masks = scenes.compose(images[picked], labels[picked], rng)
        assert image.shape == (scenes.CANVAS, scenes.CANVAS, 3) and image.dtype == np.uint8
        assert len(boxes) == len(kept) == len(masks) >= 1
        for (x0, y0, x1, y1), mask in zip(boxes, masks):
            # each border passes through a visible pixel of the garment, and nothing of it lies outside
            assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()
            assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()
            assert mask.sum() == mask[y0:y1, x0:x1].sum()
            checked += 1
        for a in range(len(masks)):  # visible pixels are disjoint: a pixel shows one garment
            for b in range(a + 1, len(masks)):
                assert not (masks[a] & masks[b]).any()
    assert checked > 80


def test_the_splits_draw_from_disjoint_items():
    pools = scenes.split_items(60000, np.random.default_rng(0))
    assert len(pools["pretrain"]) == scenes.PRETRAIN_POOL and len(pools["train"]) == 60000 - scenes.PRETRAIN_POOL
    assert not set(pools["pretrain"].tolist()) & set(pools["train"].tolist())
    # each scene's items come from its pool only, each used once before any twice
    images = np.zeros((20, 28, 28), np.uint8)
    images[:, 5:20, 5:20] = 200
    pool = np.array([3, 7, 11, 12, 19])
    drawn = [picked for _, _, _, picked in scenes.draw_scenes(images, np.arange(20) % 10, pool, 4,
                                                              np.random.default_rng(0))]
    flat = np.concatenate(drawn)
    assert set(flat.tolist()) <= set(pool.tolist())
    first = flat[:len(pool)] if len(flat) >= len(pool) else flat
    assert len(set(first.tolist())) == len(first)


def test_written_scenes_are_coco_files_reused_and_deterministic(tmp_path, fake_fmnist):
    from pycocotools.coco import COCO

    a = scenes.write_scenes(str(tmp_path / "a"), fake_fmnist, pretrain=12, train=10, test=6)
    b = scenes.write_scenes(str(tmp_path / "b"), fake_fmnist, pretrain=12, train=10, test=6)
    for split in ("train", "test"):
        path = a[f"{split}_annotations"]
        with open(path, "rb") as one, open(b[f"{split}_annotations"], "rb") as two:
            assert one.read() == two.read()
        gt = COCO(path)
        assert sorted(gt.getCatIds()) == list(range(1, 11))
        assert len(gt.getImgIds()) == (10 if split == "train" else 6)
        for annotation in gt.dataset["annotations"]:
            x, y, w, h = annotation["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert all(os.path.isfile(os.path.join(a[split], image["file_name"])) for image in gt.dataset["images"])
    assert len(os.listdir(a["pretrain"])) == 12
    with open(a["pretrain_labels"], encoding="utf-8") as handle:
        lines = handle.read().split("\n")[:-1]
    assert len(lines) == 12 and all(0 < int(line.split()[1]) < 1024 for line in lines)
    stamp = os.stat(os.path.join(a["root"], scenes.MARKER)).st_mtime_ns
    scenes.write_scenes(str(tmp_path / "a"), fake_fmnist, pretrain=12, train=10, test=6)  # the same settings
    assert os.stat(os.path.join(a["root"], scenes.MARKER)).st_mtime_ns == stamp


def test_the_command_line_refuses_bad_counts_in_one_line(tmp_path, fake_fmnist, capsys):
    assert scenes.main([str(tmp_path / "s"), "--fmnist-dir", fake_fmnist, "--pretrain", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert scenes.main([str(tmp_path / "s"), "--fmnist-dir", str(tmp_path / "none")]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert json.loads(capsys.readouterr().out or "{}") == {}
