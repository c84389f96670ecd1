"""The torch backend: Batch contract, exact crop reporting, determinism, sharding, resume, bad data."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from conftest import BAD_KINDS, ODD_KINDS, write_odd_image
from geometry import assert_same_source_region, coordinate_image, cut_view
from maskco.boxes import sample_boxes
from pipelines import Batch, DataError, build_loader
from pipelines.torch_loader import (ResumableBatchSampler, Window, build_torch_loader, crop_window,
                                    draft_reduction)

SIZE = 32  # view side: small keeps the tests fast and lets draft mode kick in on 200 x 150 sources


def make_loader(source, **options):
    settings = dict(batch_size=4, image_size=SIZE, device=torch.device("cpu"), workers=0)
    return build_torch_loader(source, **{**settings, **options})


def run_epoch(loader, epoch=0, skip_batches=0) -> list[Batch]:
    loader.set_epoch(epoch, skip_batches)
    return list(loader)


def cat(batches: list[Batch], field: str) -> torch.Tensor:
    return torch.cat([getattr(b, field) for b in batches])


def source_tensor(path: str) -> torch.Tensor:
    """uint8 [3, H, W]: the full-resolution decode (no draft) that the crops refer to."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def test_batch_contract(sample_root):
    loader = build_loader("torch", sample_root, batch_size=4, image_size=SIZE, device="cpu", workers=0)
    batches = run_epoch(loader)
    assert len(loader) == len(batches) == 24 // 4
    for batch in batches:
        assert batch.view_q.shape == batch.view_k.shape == (4, 3, SIZE, SIZE)
        assert batch.view_q.dtype == batch.view_k.dtype == torch.uint8
        assert batch.crop_q.shape == batch.crop_k.shape == (4, 5)
        assert batch.crop_q.dtype == torch.float32 and batch.index.dtype == batch.label.dtype == torch.int64
        assert all(t.device.type == "cpu" for t in (batch.view_q, batch.crop_k, batch.index, batch.label))
        for crop in (batch.crop_q, batch.crop_k):
            assert (crop[:, :4] >= 0).all() and (crop[:, :4] <= 1).all()
            assert (crop[:, 2] > crop[:, 0]).all() and (crop[:, 3] > crop[:, 1]).all()
            assert set(crop[:, 4].tolist()) <= {0.0, 1.0}
    for index, label in zip(cat(batches, "index").tolist(), cat(batches, "label").tolist()):
        assert loader.images.classes[label] == os.path.basename(os.path.dirname(loader.images.paths[index]))
    assert sorted(cat(batches, "index").tolist()) == list(range(24))  # 24 = 6 full batches: all seen


@pytest.mark.parametrize("draft", [False, True])
def test_reported_crops_reproduce_the_views(sample_root, draft):
    """Re-cutting the full-resolution source at the reported window (torchvision crop + resize +
    flip) gives the view: exactly without draft; within the difference between a reduced-scale
    JPEG decode and a full one with draft, where a shift by one view pixel does worse."""
    loader = make_loader(sample_root, draft=draft, batch_size=8)
    reductions = []
    for batch in run_epoch(loader):
        for i in range(len(batch)):
            source = source_tensor(loader.images.paths[batch.index[i]])
            height, width = source.shape[1:]
            windows = []
            for view, crop in ((batch.view_q[i], batch.crop_q[i]), (batch.view_k[i], batch.crop_k[i])):
                recut = cut_view(source, crop, SIZE)
                windows.append(_window(crop, width, height))
                if not draft:
                    assert torch.equal(recut, view), (loader.images.paths[batch.index[i]], crop)
                    continue
                error = (recut.float() - view.float()).abs().mean().item()
                assert error < 6.0, (loader.images.paths[batch.index[i]], crop, error)
                shifted = cut_view(source, _shift_one_view_pixel(crop, width, height), SIZE)
                assert (shifted.float() - view.float()).abs().mean().item() > error
            reductions.append(draft_reduction(windows, SIZE))
    assert max(reductions) > 1  # the draft path was exercised (and, with draft=False, bypassed)


def _window(crop: torch.Tensor, width: int, height: int) -> Window:
    left, top, right, bottom = (crop[:4] * torch.tensor([width, height, width, height])).round().int().tolist()
    return Window(left, top, right - left, bottom - top, bool(crop[4]))


def _shift_one_view_pixel(crop: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The crop moved sideways by about one view pixel (towards the image centre), on the pixel grid."""
    step = max(1, round(float(crop[2] - crop[0]) * width / SIZE)) / width
    step = step if crop[0] + crop[2] < 1 else -step
    return crop + torch.tensor([step, 0, step, 0, 0])


def test_crop_window_is_torchvisions_algorithm():
    """Fed torch's draws, crop_window returns exactly RandomResizedCrop.get_params' window,
    including the central fallback (a very wide image with a large minimum scale)."""

    class TorchDraws:
        def uniform(self, low, high):
            return torch.empty(1).uniform_(low, high).item()

        def integers(self, low, high):
            return torch.randint(low, high, size=(1,)).item()

    for width, height, scale in [(200, 150, (0.2, 1.0)), (97, 301, (0.08, 1.0)), (1000, 20, (0.9, 1.0))]:
        for seed in range(40):
            image = torch.empty(3, height, width)
            torch.manual_seed(seed)
            top, left, h, w = T.RandomResizedCrop.get_params(image, scale, [3 / 4, 4 / 3])
            torch.manual_seed(seed)
            assert crop_window(width, height, scale, (3 / 4, 4 / 3), TorchDraws()) == (left, top, w, h)


def test_same_views_for_any_worker_count_and_different_epochs_differ(sample_root):
    serial = make_loader(sample_root)
    parallel = make_loader(sample_root, workers=2)
    for epoch in (0, 3):
        a, b = run_epoch(serial, epoch), run_epoch(parallel, epoch)
        for field in ("view_q", "view_k", "crop_q", "crop_k", "index", "label"):
            assert torch.equal(cat(a, field), cat(b, field)), field
    epoch_0, epoch_1 = run_epoch(serial, 0), run_epoch(serial, 1)
    assert not torch.equal(cat(epoch_0, "index"), cat(epoch_1, "index"))
    order_0 = cat(epoch_0, "index").argsort()
    order_1 = cat(epoch_1, "index").argsort()
    assert not torch.equal(cat(epoch_0, "crop_q")[order_0], cat(epoch_1, "crop_q")[order_1])


def test_ranks_take_disjoint_shards_that_cover_the_epoch(sample_root):
    single = run_epoch(make_loader(sample_root, batch_size=8, seed=5), epoch=2)
    shards = [make_loader(sample_root, batch_size=4, rank=r, world_size=2, seed=5) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    per_rank = [run_epoch(loader, epoch=2) for loader in shards]
    seen = [set(cat(batches, "index").tolist()) for batches in per_rank]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))
    # Each global step covers the same images as the one-rank run with the same global batch,
    # and every image gets the same views: they depend on (seed, epoch, index) only.
    for step in range(3):
        together = torch.cat([per_rank[r][step].index for r in range(2)])
        assert sorted(together.tolist()) == sorted(single[step].index.tolist())
    by_index = {int(i): v for i, v in zip(cat(single, "index"), cat(single, "view_q"))}
    for batches in per_rank:
        for i, view in zip(cat(batches, "index"), cat(batches, "view_q")):
            assert torch.equal(view, by_index[int(i)])


def test_sampler_trims_to_whole_global_batches_and_eval_takes_everything():
    """23 images, 3 ranks x 2 per step: 3 global steps of 6; 5 images (different ones each epoch)
    wait for a later epoch. Without shuffle / drop_last every image is taken once."""
    left_out = []
    for epoch in (0, 1):
        shards = [ResumableBatchSampler(23, 2, r, 3, seed=9) for r in range(3)]
        for sampler in shards:
            sampler.set_epoch(epoch)
        steps = [list(sampler) for sampler in shards]
        assert [len(s) for s in shards] == [len(s) for s in steps] == [3, 3, 3]
        taken = [index for rank in steps for batch in rank for _, index in batch]
        assert len(taken) == len(set(taken)) == 18
        assert all(e == epoch for rank in steps for batch in rank for e, _ in batch)
        left_out.append(set(range(23)) - set(taken))
    assert left_out[0] != left_out[1]
    evaluation = [ResumableBatchSampler(23, 2, r, 3, seed=9, shuffle=False, drop_last=False) for r in range(3)]
    assert [len(s) for s in evaluation] == [4, 4, 4]
    assert sorted(i for s in evaluation for batch in s for _, i in batch) == list(range(23))
    assert [i for batch in evaluation[1] for _, i in batch] == list(range(1, 23, 3))


def test_skip_batches_resumes_exactly(sample_root):
    loader = make_loader(sample_root, workers=2)
    full = run_epoch(loader, epoch=4)
    resumed = run_epoch(loader, epoch=4, skip_batches=2)
    assert len(resumed) == len(full) - 2 and len(loader) == len(full)
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a.index, b.index) and torch.equal(a.view_k, b.view_k)
        assert torch.equal(a.crop_q, b.crop_q)
    assert run_epoch(loader, epoch=4, skip_batches=len(loader)) == []
    loader.close()  # stops the workers; the next epoch starts new ones and sees the same data
    assert torch.equal(cat(run_epoch(loader, epoch=4), "view_q"), cat(full, "view_q"))
    with pytest.raises(ValueError, match="skip_batches"):
        loader.set_epoch(4, skip_batches=len(loader) + 1)


def test_unreadable_images_are_replaced_and_counted(sample_copy):
    bad = {write_odd_image(kind, os.path.join(sample_copy, "astronaut")) for kind in BAD_KINDS}
    loader = make_loader(sample_copy, workers=2)  # 28 images = 7 full batches: every file is read
    with pytest.warns(UserWarning) as caught:
        batches = run_epoch(loader)
    assert loader.skipped >= len(bad)  # more if a replacement drawn was itself unreadable
    first_epoch = loader.skipped
    assert {path for path, _ in loader.skipped_paths} == bad
    assert all(reason for _, reason in loader.skipped_paths)
    warned = [str(w.message) for w in caught if "unreadable image" in str(w.message)]
    assert len(warned) == len(bad) and all(any(p in m for m in warned) for p in bad)
    served = {loader.images.paths[i] for i in cat(batches, "index").tolist()}
    assert not served & bad and len(cat(batches, "index")) == 28  # replaced, not dropped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second epoch counts again but does not warn again
        run_epoch(loader, epoch=1)
    assert loader.skipped >= first_epoch + len(bad)
    assert torch.equal(cat(run_epoch(loader, epoch=1), "index"), cat(run_epoch(loader, epoch=1), "index"))


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_strict_data_raises_naming_the_file(sample_copy, kind):
    path = write_odd_image(kind, os.path.join(sample_copy, "coffee"))
    loader = make_loader(sample_copy, strict_data=True, workers=2 if kind == "corrupt_jpeg" else 0)
    with pytest.raises(DataError, match=os.path.basename(path)):
        run_epoch(loader)


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_other_image_modes_are_converted_to_rgb(tmp_path, kind):
    folder = str(tmp_path / "odd")
    write_odd_image(kind, folder)
    loader = make_loader(folder, batch_size=1, strict_data=True, eval_mode=True)
    (batch,) = run_epoch(loader)
    assert batch.view_q.shape == (1, 3, SIZE, SIZE) and batch.label.item() == -1
    view = batch.view_q[0].int()
    if kind == "grayscale_jpeg":
        assert torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])
    else:  # the gradient's colours survive: red grows left to right
        assert view[0, :, -4:].float().mean() > view[0, :, :4].float().mean() + 50


@pytest.mark.parametrize("draft", [False, True])
def test_eval_mode_one_centre_view_and_every_image_once(sample_root, draft):
    shards = [make_loader(sample_root, batch_size=5, rank=r, world_size=2, eval_mode=True, draft=draft)
              for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]  # 12 images each: 5 + 5 + 2 (last batch kept)
    per_rank = [run_epoch(s, epoch=0) for s in shards]
    indices = sorted(cat(per_rank[0], "index").tolist() + cat(per_rank[1], "index").tolist())
    assert indices == list(range(24))
    assert torch.equal(cat(per_rank[0], "view_q"), cat(run_epoch(shards[0], epoch=7), "view_q"))
    slack = 4 if draft else 0  # source pixels: draft decodes these at 1/4, windows snap to its grid
    for batch in per_rank[0]:
        assert batch.view_k is batch.view_q and torch.equal(batch.crop_q, batch.crop_k)
        assert (batch.crop_q[:, 4] == 0).all()
        for i in range(len(batch)):
            source = source_tensor(shards[0].images.paths[batch.index[i]])
            height, width = source.shape[1:]
            window = _window(batch.crop_q[i], width, height)
            side = round(min(width, height) * SIZE / int(SIZE / 0.875))  # shorter side to S / 0.875
            assert abs(window.width - side) <= slack and abs(window.height - side) <= slack
            assert abs(2 * window.left + window.width - width) <= 1 + 2 * slack  # centred
            assert abs(2 * window.top + window.height - height) <= 1 + 2 * slack
            recut = cut_view(source, batch.crop_q[i], SIZE)
            if draft:
                assert (recut.float() - batch.view_q[i].float()).abs().mean() < 6.0
            else:
                assert torch.equal(recut, batch.view_q[i])


def test_sources_without_labels_and_bad_sources(sample_root, tmp_path):
    paths = make_loader(sample_root).images.paths
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths[:8]) + "\n")
    (batch, _) = run_epoch(make_loader(str(listing)))
    assert (batch.label == -1).all()
    with pytest.raises(DataError, match="does not exist"):
        make_loader(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "folder" / "cats")
    os.makedirs(tmp_path / "folder" / "dogs")
    write_odd_image("cmyk_jpeg", str(tmp_path / "folder" / "cats"))
    with pytest.raises(DataError, match="dogs"):
        make_loader(str(tmp_path / "folder"))
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_loader(sample_root, batch_size=8, world_size=4)


@pytest.mark.parametrize("option, value", [
    ("batch_size", 0), ("image_size", 0), ("rank", 2), ("seed", -1), ("crop_scale", (0.5, 0.2)),
    ("crop_ratio", (0.0, 1.0)), ("flip_prob", 1.5), ("prefetch_factor", 0)])
def test_bad_arguments_name_the_argument(sample_root, option, value):
    with pytest.raises(ValueError, match=option):
        make_loader(sample_root, **{"world_size": 2, option: value})


@pytest.mark.parametrize("draft", [False, True])
def test_masked_region_and_positive_show_the_same_source_region(tmp_path, draft):
    """A coordinate-encoded source through this backend and maskco.boxes: the query's masked box and
    the key's positive box must show the same part of the source image (tests/geometry.py)."""
    sizes = [(256, 192), (192, 256), (300, 200), (224, 224), (320, 180), (200, 260), (256, 256), (400, 300)]
    os.makedirs(tmp_path / "c")
    for k, (width, height) in enumerate(sizes):
        pixels = coordinate_image(height, width).permute(1, 2, 0).numpy()  # [H, W, 3]
        Image.fromarray(pixels).save(tmp_path / "c" / f"{k}.jpg", quality=98, subsampling=0)
    loader = make_loader(str(tmp_path), batch_size=8, image_size=64, draft=draft, seed=1)
    valid_total = 0
    for epoch in range(3):
        (batch,) = run_epoch(loader, epoch)
        boxes = sample_boxes(batch.crop_q, batch.crop_k, 64, 4, torch.Generator().manual_seed(epoch), min_size=8)
        assert_same_source_region(batch.view_q, batch.view_k, boxes.masked, boxes.keys[:, 0],
                                  valid=boxes.valid, atol=0.01)
        valid_total += int(boxes.valid.sum())
        swapped = sample_boxes(batch.crop_k, batch.crop_q, 64, 4, torch.Generator().manual_seed(epoch), min_size=8)
        with pytest.raises(AssertionError):  # the check can fail: crops attributed to the wrong view
            assert_same_source_region(batch.view_q, batch.view_k, swapped.masked, swapped.keys[:, 0],
                                      valid=swapped.valid, atol=0.01)
    assert valid_total >= 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("eval_mode", [False, True])
def test_batches_arrive_on_the_gpu_unchanged(sample_root, eval_mode):
    device = torch.device("cuda")
    on_gpu = run_epoch(make_loader(sample_root, device=device, workers=2, eval_mode=eval_mode))
    on_cpu = run_epoch(make_loader(sample_root, eval_mode=eval_mode))
    assert on_gpu[0].view_q.device.type == "cuda" and on_gpu[0].crop_k.device.type == "cuda"
    assert (on_gpu[0].view_k is on_gpu[0].view_q) == eval_mode
    for field in ("view_q", "view_k", "crop_q", "crop_k", "index", "label"):
        assert torch.equal(cat(on_gpu, field).cpu(), cat(on_cpu, field)), field
