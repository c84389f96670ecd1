"""The mosaics (pipelines/mosaics.py) and the region probe (maskco/evaluate/region.py) on a tiny fake Fashion-MNIST."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from maskco.evaluate import region
from maskco.evaluate.features import prepare_images
from maskco.model import Encoder
from pipelines import fmnist, mosaics
from pipelines.sources import DataError
from test_quality import write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALUES = 20 + 20 * np.arange(10)  # class c's fake item: a flat 28 x 28 square of grey VALUES[c]


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> str:
    """80 train and 40 test items, each a flat square whose grey level gives its class; a dot makes every
    item unique (so an item can be found again in a mosaic by its pixels)."""
    folder = tmp_path_factory.mktemp("fmnist")
    for split, count in (("train", 80), ("t10k", 40)):
        labels = np.arange(count) % 10
        images = np.repeat(VALUES[labels][:, None, None], 28 * 28, axis=1).reshape(count, 28, 28)
        images[np.arange(count), np.arange(count) // 28, np.arange(count) % 28] = 255
        write_idx(str(folder / fmnist.FILES[split][0]), images)
        write_idx(str(folder / fmnist.FILES[split][1]), labels)
    return str(folder)


@pytest.fixture(scope="module")
def probe_sets(fake_fmnist, tmp_path_factory) -> dict:
    return mosaics.write_probe_sets(str(tmp_path_factory.mktemp("probe") / "sets"), fake_fmnist, bank=6, query=3)


def slot_pixels(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mosaics [M, 56, 56] -> what each box covers, [M, 4, 28, 28]."""
    return np.stack([images[:, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes.astype(int)], axis=1)


# ---- mosaics

def test_compose_puts_item_k_in_box_k():
    items = np.arange(4 * 28 * 28).reshape(4, 28, 28) % 251
    mosaic = mosaics.compose(items, np.array([[2, 0, 3, 1]]))  # [1, 56, 56]
    assert np.array_equal(slot_pixels(mosaic, mosaics.item_boxes())[0], items[[2, 0, 3, 1]])


def test_probe_boxes_cover_exactly_their_items(fake_fmnist, probe_sets):
    images, labels = fmnist.load_split(fake_fmnist, "train")
    bank = mosaics.load_probe_set(probe_sets["bank"])
    assert np.array_equal(slot_pixels(bank["images"], bank["boxes"]), images[bank["items"]])
    assert np.array_equal(bank["labels"], labels[bank["items"]])


def test_probe_sets_are_deterministic(fake_fmnist, probe_sets, tmp_path):
    again = mosaics.write_probe_sets(str(tmp_path / "again"), fake_fmnist, bank=6, query=3)
    for name in mosaics.PROBE_FILES:
        first, second = mosaics.load_probe_set(probe_sets[name]), mosaics.load_probe_set(again[name])
        assert all(np.array_equal(first[key], second[key]) for key in first)


def test_bank_and_query_are_disjoint_by_source_item(probe_sets):
    bank, query = (mosaics.load_probe_set(probe_sets[name]) for name in mosaics.PROBE_FILES)
    assert (str(bank["split"]), str(query["split"])) == ("train", "t10k")  # different IDX files
    for probe in (bank, query):
        assert len(np.unique(probe["items"])) == probe["items"].size  # no item twice
        counts = np.bincount(probe["labels"].ravel(), minlength=10)
        assert counts.max() - counts.min() <= 1  # class-balanced


def test_pretrain_mosaics_are_deterministic_flat_pngs_of_train_items(fake_fmnist, tmp_path):
    first = mosaics.write_pretrain_mosaics(str(tmp_path / "a"), fake_fmnist, count=30, seed=3)
    second = mosaics.write_pretrain_mosaics(str(tmp_path / "b"), fake_fmnist, count=30, seed=3)
    names = sorted(os.listdir(first))
    assert len(names) == 30 and names == sorted(os.listdir(second))
    pictures = np.stack([np.asarray(Image.open(os.path.join(first, name))) for name in names])  # [30, 56, 56]
    assert all(np.array_equal(pictures[i], np.asarray(Image.open(os.path.join(second, name))))
               for i, name in enumerate(names))
    train, _ = fmnist.load_split(fake_fmnist, "train")
    tiles = slot_pixels(pictures, mosaics.item_boxes()).reshape(-1, 28 * 28)  # [120, 784]
    # 120 slots from 80 items: every item once before any twice, so every item shows up
    found = {int(np.flatnonzero((train.reshape(80, -1) == tile).all(1))[0]) for tile in tiles}
    assert found == set(range(80))


def test_writers_reuse_matching_settings_and_refuse_a_foreign_folder(fake_fmnist, tmp_path):
    folder = mosaics.write_pretrain_mosaics(str(tmp_path / "m"), fake_fmnist, count=3)
    stamp = os.stat(os.path.join(folder, "mosaic_000000.png")).st_mtime_ns
    mosaics.write_pretrain_mosaics(str(tmp_path / "m"), fake_fmnist, count=3)
    assert os.stat(os.path.join(folder, "mosaic_000000.png")).st_mtime_ns == stamp
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no mosaics.json"):
        mosaics.write_probe_sets(str(tmp_path / "foreign"), fake_fmnist, bank=2, query=2)


def test_too_many_mosaics_is_one_clear_error_and_leaves_nothing(fake_fmnist, tmp_path):
    with pytest.raises(ValueError, match=r"80 mosaics need 320 distinct items; the split has 80 \(use 1..20"):
        mosaics.write_probe_sets(str(tmp_path / "p"), fake_fmnist, bank=80, query=2)
    assert os.listdir(tmp_path) == []  # the staging folder is gone too


def test_missing_fashion_mnist_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="apt-get install"):
        mosaics.write_pretrain_mosaics(str(tmp_path / "m"), str(tmp_path / "nowhere"), count=3)


# ---- the probe

@pytest.mark.parametrize("input_size, map_size, stride", [(64, 2, 32), (56, 2, 32), (33, 2, 32), (64, 8, 8),
                                                          (64, 4, 16), (224, 7, 32)])
def test_feature_stride_from_sizes(input_size, map_size, stride):
    assert region.feature_stride(input_size, map_size) == stride


def test_region_features_are_encoder_pool_of_the_item_box(probe_sets):
    torch.manual_seed(0)
    encoder = Encoder("resnet18", mph="none", head_hidden=8, head_dim=8).eval()
    bank = mosaics.load_probe_set(probe_sets["bank"])
    images, boxes = torch.from_numpy(bank["images"][:3]), torch.from_numpy(bank["boxes"])
    features, stride = region.region_features(encoder.backbone, images, boxes, view_size=64)  # [12, 512]
    # by hand: the 56 px mosaic as a 64 px view, its boxes scaled with it, Encoder.pool on C5
    view = prepare_images(region.views(images, 64))  # [3, 3, 64, 64]
    with torch.no_grad():
        expected = encoder.pool(encoder.trunk(view), boxes.expand(3, -1, -1) * (64 / 56))  # [3, 4, 512]
    assert stride == encoder.stride
    torch.testing.assert_close(features, nn.functional.normalize(expected.flatten(0, 1), dim=1))


def one_hot_backbone() -> nn.Module:
    """A ResNet-shaped net whose feature at a pixel is the one-hot class of the fake items' grey level there:
    channel c = relu(1 - |x - v_c| / gap), v_c the normalised grey of class c, gap the step between classes."""
    values = (torch.tensor(VALUES, dtype=torch.float32) / 255 - 0.485) / 0.229  # normalised red channel
    gap = float(values[1] - values[0])
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 20, 1)  # (x - v_c) / gap and its negative, for every class
    with torch.no_grad():
        net.conv1.weight.zero_()
        net.conv1.weight[0::2, 0], net.conv1.weight[1::2, 0] = 1 / gap, -1 / gap
        net.conv1.bias[0::2], net.conv1.bias[1::2] = -values / gap, values / gap
    net.layer1 = nn.Conv2d(20, 10, 1)  # 1 - |x - v_c| / gap
    with torch.no_grad():
        net.layer1.weight.zero_()
        net.layer1.weight[torch.arange(10), 2 * torch.arange(10)] = -1.0
        net.layer1.weight[torch.arange(10), 2 * torch.arange(10) + 1] = -1.0
        net.layer1.bias.fill_(1.0)
    net.bn1, net.maxpool, net.layer2, net.layer3, net.layer4, net.fc = (
        nn.Identity(), nn.Identity(), nn.ReLU(), nn.Identity(), nn.Identity(), nn.Identity())
    return net


def test_separable_items_are_all_found(probe_sets):
    result = region.region_probe(one_hot_backbone(), probe_sets, image_size=32)
    assert [result[key] for key in ("region_knn_top1", "region_knn_top1_k20", "region_knn_top1_global",
                                    "region_knn_top1_global_k20")] == [100.0] * 4


def test_without_the_global_baseline_only_region_rows_come_back(probe_sets):
    result = region.region_probe(one_hot_backbone(), probe_sets, image_size=32, global_baseline=False)
    assert sorted(key for key in result if key.startswith("region_knn")) == ["region_knn_top1", "region_knn_top1_k20"]


def small_stem_resnet18() -> nn.Module:
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool, net.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    return net


@pytest.mark.parametrize("make, stride", [(lambda: torchvision.models.resnet18(num_classes=1), 32),
                                          (small_stem_resnet18, 8)], ids=["imagenet_stem", "small_stem"])
def test_probe_runs_on_random_resnet18(make, stride, probe_sets):
    torch.manual_seed(0)
    backbone = make()
    backbone.fc = nn.Identity()
    backbone.train()
    result = region.region_probe(backbone, probe_sets, image_size=32, batch_size=4)
    accuracies = [value for key, value in result.items() if key.startswith("region_knn")]
    assert len(accuracies) == 4 and all(0 <= value <= 100 for value in accuracies)
    assert (result["region_stride"], result["region_bank_items"], result["region_query_items"]) == (stride, 24, 12)
    assert backbone.training  # its mode is given back


def test_real_fashion_mnist_probe_sets_hold_real_items(tmp_path):
    if not os.path.isfile(os.path.join(fmnist.DEFAULT_DIR, fmnist.FILES["t10k"][0])):
        pytest.skip(f"Fashion-MNIST is not installed under {fmnist.DEFAULT_DIR} ({fmnist.INSTALL})")
    query = mosaics.load_probe_set(mosaics.write_probe_sets(str(tmp_path / "p"), bank=1, query=5)["query"])
    images, labels = fmnist.load_split(fmnist.DEFAULT_DIR, "t10k")
    assert np.array_equal(slot_pixels(query["images"], query["boxes"]), images[query["items"]])
    assert np.array_equal(query["labels"], labels[query["items"]])


def test_command_line_bad_input_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "maskco.evaluate.region", "--random-init", "--arch", "resnet18",
                             "--probe-dir", str(tmp_path / "p"), "--fmnist-dir", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 2
    assert result.stderr.startswith("maskco.evaluate.region: error: Fashion-MNIST not found")
    assert len(result.stderr.strip().splitlines()) == 1
