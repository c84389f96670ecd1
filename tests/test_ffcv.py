"""FFCV backend: .beton writer (round trip, bad files) and the decode-once, two-view loader.

numba compiles each loader's decoder once (seconds), so loaders are module-scoped and shared.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv", reason="FFCV is not installed (apt-get install pkg-config libopencv-dev "
                    "libturbojpeg0-dev; pip install -e .[ffcv])")
import cv2  # noqa: E402  (installed with ffcv)

import pipelines  # noqa: E402
from maskco.boxes import sample_boxes  # noqa: E402
from pipelines import ffcv_loader, ffcv_ops  # noqa: E402
from pipelines.ffcv_loader import build_ffcv_loader  # noqa: E402
from pipelines.ffcv_ops import INTERPOLATIONS, crop_rows, crop_window, cut_view, window_params  # noqa: E402
from pipelines.ffcv_writer import check_beton, list_source, main, read_image, write_beton  # noqa: E402
from pipelines.sources import DataError, list_images  # noqa: E402
from pipelines.torch_loader import ResumableBatchSampler  # noqa: E402
from tests.conftest import BAD_KINDS, ODD_KINDS, write_odd_image  # noqa: E402
from tests.geometry import assert_same_source_region, coordinate_image  # noqa: E402

SIZE = 64  # view side: sources are 110-240 px, so "auto" both shrinks (INTER_AREA) and enlarges
PARAMS = window_params((0.2, 1.0), (3 / 4, 4 / 3), 0.5)


@pytest.fixture(scope="module")
def beton(sample_root, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ffcv") / "sample.beton")
    write_beton(sample_root, path, jpeg_quality=95, workers=2, progress=False)
    return path


@pytest.fixture(scope="module")
def loader(beton):
    """Through the registry; 24 images, 3 steps of 8."""
    return pipelines.build_loader("ffcv", beton, batch_size=8, image_size=SIZE, device="cpu", seed=0,
                                  workers=2)


@pytest.fixture(scope="module")
def rank_loaders(beton):
    """Ranks 0 and 1 of 2, one thread each: 3 steps of 4 per rank."""
    return [build_ffcv_loader(beton, batch_size=4, image_size=SIZE, device="cpu", rank=rank, world_size=2,
                              seed=0, workers=1) for rank in (0, 1)]


def _epoch(loader, epoch, skip_batches=0):
    """Every batch of one pass, cloned (the loader reuses its buffers)."""
    loader.set_epoch(epoch, skip_batches)
    return [pipelines.Batch(*(t.clone() for t in (b.view_q, b.view_k, b.crop_q, b.crop_k, b.index, b.label)))
            for b in loader]


def _cat(batches, name):
    return torch.cat([getattr(b, name) for b in batches])


# ---- writer: round trip

def test_round_trip_keeps_samples_labels_and_pixels(beton, sample_root):
    images, info = list_images(sample_root), check_beton(beton)
    assert info.num_samples == len(images) and info.labels.tolist() == images.labels
    for index, path in enumerate(images.paths):
        stored = read_image(beton, index).astype(np.float64)  # [H, W, 3]
        original = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        assert stored.shape == original.shape
        # JPEG tolerance: a second encode (quality 95, 4:2:0 chroma) and the fast IDCT give a mean
        # error of 1-2 and 37-43 dB here; a channel swap or a one-pixel shift gives tens / under 30 dB.
        assert np.abs(stored - original).mean() < 3.0
        assert 10 * np.log10(255**2 / np.mean((stored - original) ** 2)) > 35  # PSNR, dB


def test_raw_mode_is_exact_and_a_list_keeps_its_labels(sample_root, tmp_path):
    paths = list_images(sample_root).paths[:4]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[0]} 7\n# a comment\n{paths[1]}\n{paths[2]} 2\n{paths[3]}\n")
    out = str(tmp_path / "raw.beton")
    summary = write_beton(str(listing), out, write_mode="raw", workers=1, progress=False)
    info = check_beton(out)
    assert summary.written == 4 and info.labels.tolist() == [7, -1, 2, -1]
    assert (info.images["mode"] == 1).all()
    for index, path in enumerate(paths):
        np.testing.assert_array_equal(read_image(out, index), np.asarray(Image.open(path).convert("RGB")))


def test_proportion_mode_mixes_jpeg_and_raw_deterministically(sample_root, tmp_path):
    modes = []
    for name in ("a", "b"):
        out = str(tmp_path / f"{name}.beton")
        write_beton(sample_root, out, write_mode="proportion", compress_probability=0.5, workers=2,
                    progress=False)
        modes.append(check_beton(out).images["mode"].tolist())
    assert modes[0] == modes[1] and 0 < sum(modes[0]) < len(modes[0])


def test_max_resolution_shrinks_large_images(sample_root, tmp_path):
    out = str(tmp_path / "small.beton")
    summary = write_beton(sample_root, out, max_resolution=64, workers=1, progress=False)
    info = check_beton(out)
    assert max(summary.largest) <= 64 and np.maximum(info.images["width"], info.images["height"]).max() == 64


# ---- writer: bad input

@pytest.fixture
def messy_folder(sample_copy, monkeypatch):
    """A flat folder: 24 good JPEGs, every bad and odd kind, and a subfolder that cannot be read."""
    flat = os.path.join(os.path.dirname(sample_copy), "flat")
    shutil.copytree(os.path.join(sample_copy, "astronaut"), flat)
    for kind in BAD_KINDS + ODD_KINDS:
        write_odd_image(kind, flat)
    locked = os.path.join(flat, "locked")
    write_odd_image("cmyk_jpeg", locked)
    listdir = os.listdir

    def refuse_locked(path="."):  # root may read any folder, so chmod 000 would not do
        if os.path.abspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refuse_locked)
    return flat


def test_conversion_skips_bad_files_and_converts_odd_ones(messy_folder, tmp_path):
    out = str(tmp_path / "messy.beton")
    summary = write_beton(messy_folder, out, workers=2, progress=False)
    good = len([n for n in os.listdir(messy_folder) if n.startswith("astronaut")])
    assert summary.written == good + len(ODD_KINDS) == check_beton(out).num_samples
    reasons = dict(summary.skipped)
    expected = ["locked"] + [kind + ".jpg" for kind in BAD_KINDS]
    assert sorted(os.path.basename(p) for p in reasons) == sorted(expected)
    assert "0 bytes" in reasons[os.path.join(messy_folder, "zero_byte.jpg")]
    assert "cannot read folder" in reasons[os.path.join(messy_folder, "locked")]
    assert set(summary.converted) == {"JPEG CMYK", "JPEG L", "PNG RGBA", "PNG P"}
    report = str(summary)
    assert f"skipped {len(BAD_KINDS) + 1}" in report and "not a readable image" in report
    assert open(out + ".skipped.txt").read().count("\n") == len(BAD_KINDS) + 1


def test_strict_conversion_stops_and_writes_nothing(messy_folder, tmp_path):
    out = tmp_path / "out" / "strict.beton"
    with pytest.raises(DataError, match=r"5 unreadable file\(s\) or folder\(s\)[\s\S]*zero_byte.jpg"):
        write_beton(messy_folder, str(out), workers=1, strict=True, progress=False)
    assert not out.parent.exists()


def test_listing_matches_list_images(sample_root):
    for source in (sample_root, os.path.join(sample_root, "coffee")):  # an ImageFolder, a flat folder
        images, problems = list_source(source)
        assert images == list_images(source) and problems == []


def test_command_line(sample_root, tmp_path, capsys):
    out = str(tmp_path / "cli.beton")
    main([os.path.join(sample_root, "coffee"), out, "--workers", "1", "--quiet", "--write-mode", "raw"])
    assert f"wrote 8 images to {out}" in capsys.readouterr().out and check_beton(out).num_samples == 8
    with pytest.raises(SystemExit) as stop:
        main([sample_root, out, "--jpeg-quality", "0"])
    assert stop.value.code == 2
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing"), out])


@pytest.mark.parametrize("options, match", [
    (dict(write_mode="png"), "write_mode"), (dict(jpeg_quality=101), "jpeg_quality"),
    (dict(compress_probability=1.5), "compress_probability"), (dict(max_resolution=0), "max_resolution"),
    (dict(workers=0), "workers"),
])
def test_writer_rejects_bad_options(sample_root, tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        write_beton(sample_root, str(tmp_path / "x.beton"), **options)


# ---- loader: geometry

def test_crop_window_draws_torchvision_windows():
    heights, widths = np.full(4000, 150, dtype=np.int64), np.full(4000, 200, dtype=np.int64)
    crops = crop_rows(np.arange(4000, dtype=np.int64), heights, widths, 0, 0, PARAMS)  # [N, 2, 5]
    w, h = (crops[..., 2] - crops[..., 0]) * 200, (crops[..., 3] - crops[..., 1]) * 150  # pixels
    np.testing.assert_allclose(w, np.round(w), atol=1e-3)  # on the pixel grid
    assert (crops[..., :4] >= 0).all() and (crops[..., 2] <= 1).all() and (crops[..., 3] <= 1).all()
    assert 0.2 - 0.01 <= (w * h / 30000).min() and (w * h / 30000).max() <= 1.0
    assert 3 / 4 - 0.05 <= (w / h).min() and (w / h).max() <= 4 / 3 + 0.05
    assert abs(crops[..., 4].mean() - 0.5) < 0.02  # flips
    assert (crops[:, 0] != crops[:, 1]).any(-1).mean() > 0.99  # the two views are drawn independently
    again = crop_rows(np.arange(10, dtype=np.int64), heights[:10], widths[:10], 0, 0, PARAMS)
    other_epoch = crop_rows(np.arange(10, dtype=np.int64), heights[:10], widths[:10], 0, 1, PARAMS)
    np.testing.assert_array_equal(again, crops[:10])
    assert not np.array_equal(other_epoch, again)


def test_crop_window_falls_back_to_a_central_crop():
    # scale 1 with a ratio far from the image's: no try fits, torchvision's central crop of ratio 2.
    params = window_params((1.0, 1.0), (2.0, 2.0), 0.0)
    assert crop_window(100, 100, params, np.uint64(1), 0) == (25, 0, 50, 100, False)


def test_views_are_the_reported_windows_of_the_stored_image(loader, beton):
    batches, shrinks = _epoch(loader, 0), []
    assert len(batches) == len(loader) == 3 and batches[0].view_q.shape == (8, 3, SIZE, SIZE)
    assert batches[0].view_q.dtype == torch.uint8 and batches[0].crop_q.dtype == torch.float32
    for b in batches:
        for i in range(len(b)):
            source = read_image(beton, int(b.index[i]))  # [H, W, 3]
            height, width = source.shape[:2]
            for view, crop in ((b.view_q[i], b.crop_q[i]), (b.view_k[i], b.crop_k[i])):
                x0, y0, x1, y1, flipped = crop.tolist()
                top, bottom = round(y0 * height), round(y1 * height)
                left, right = round(x0 * width), round(x1 * width)
                expected = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
                cut_view(source, top, left, bottom - top, right - left, flipped > 0, INTERPOLATIONS["auto"],
                         expected)
                np.testing.assert_array_equal(view.permute(1, 2, 0).numpy(), expected)
                # and independently: cv2 (another OpenCV build), the method "auto" picks, then the flip
                shrink = max(bottom - top, right - left) / SIZE
                shrinks.append(shrink)
                method = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR
                reference = cv2.resize(source[top:bottom, left:right], (SIZE, SIZE), interpolation=method)
                reference = reference[:, ::-1] if flipped else reference
                assert np.abs(expected.astype(int) - reference).max() <= 1
    assert min(shrinks) < 2 <= max(shrinks)  # both of "auto"'s methods were used


@pytest.mark.parametrize("interpolation, method", [("linear", "INTER_LINEAR"), ("area", "INTER_AREA")])
def test_cut_view_interpolations_are_opencvs(interpolation, method):
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for top, left, h, w in [(0, 0, 90, 120), (10, 20, 70, 71), (5, 7, 20, 15)]:  # shrink 3.75x .. grow 1.6x
        view = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
        cut_view(image, top, left, h, w, True, INTERPOLATIONS[interpolation], view)
        window = image[top:top + h, left:left + w]
        reference = cv2.resize(window, (SIZE, SIZE), interpolation=getattr(cv2, method))
        assert np.abs(view.astype(int) - reference[:, ::-1]).max() <= 1


@pytest.fixture(scope="module")
def coordinate_beton(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("coordinates")
    for i, (height, width) in enumerate([(128, 192), (192, 128), (160, 160), (144, 208)] * 2):
        image = coordinate_image(height, width).permute(1, 2, 0).numpy()  # [H, W, 3]
        Image.fromarray(image).save(folder / f"{i}.png")
    path = str(folder / "coordinates.beton")
    write_beton(str(folder), path, write_mode="raw", workers=1, progress=False)
    return path


def test_coordinate_images_masked_box_and_positive_show_the_same_region(coordinate_beton):
    # quasi_random without the OS cache: FFCV's other reader and order, on raw pixels.
    loader = build_ffcv_loader(coordinate_beton, batch_size=4, image_size=64, device="cpu", seed=1,
                               workers=1, order="quasi_random", os_cache=False)
    batches = _epoch(loader, 0)
    assert sorted(_cat(batches, "index").tolist()) == list(range(8))
    for b in batches:
        boxes = sample_boxes(b.crop_q, b.crop_k, 64, num_negatives=0,
                             generator=torch.Generator().manual_seed(0))
        assert boxes.valid.any()
        assert_same_source_region(b.view_q, b.view_k, boxes.masked, boxes.keys[:, 0], valid=boxes.valid,
                                  atol=0.02)


# ---- loader: order, ranks, resume

def test_two_ranks_see_disjoint_samples_covering_the_dataset(rank_loaders, loader):
    for epoch in (0, 1):
        per_rank = [_epoch(r, epoch) for r in rank_loaders]
        index = [_cat(batches, "index") for batches in per_rank]
        assert len(rank_loaders[0]) == len(rank_loaders[1]) == 3
        assert set(index[0].tolist()).isdisjoint(index[1].tolist())
        assert sorted(torch.cat(index).tolist()) == list(range(24))
        for rank in (0, 1):  # the torch backend's assignment
            sampler = ResumableBatchSampler(24, 4, rank, 2, seed=0)
            sampler.set_epoch(epoch)
            assert index[rank].tolist() == [i for step in sampler for _, i in step]
    # views are a function of (seed, epoch, index) only: not of the rank, batch size or threads
    single = _epoch(loader, 1)
    by_index = {int(i): v for i, v in zip(_cat(single, "index"), _cat(single, "view_q"))}
    for i, v in zip(index[0], _cat(per_rank[0], "view_q")):
        assert torch.equal(by_index[int(i)], v)


def test_resume_sees_the_batches_the_uninterrupted_epoch_would(loader):
    full = _epoch(loader, 2)
    loader.set_epoch(2)
    next(iter(loader))  # an interrupted pass: its thread must be stopped cleanly
    resumed = _epoch(loader, 2, skip_batches=1)
    assert len(resumed) == len(full) - 1
    for a, b in zip(full[1:], resumed):
        for name in ("view_q", "view_k", "crop_q", "crop_k", "index", "label"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(_cat(_epoch(loader, 3), "crop_q"), _cat(full, "crop_q"))
    assert [len(b) for b in loader] == [8, 8, 8]  # without set_epoch: the next epoch, from its start


def test_a_failure_in_the_loading_thread_is_raised_not_a_hang(loader, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(ffcv_loader._EpochThread, "run_pipeline", fail)
    with pytest.raises(RuntimeError, match="loading thread failed"):
        list(loader)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches(beton, loader):
    cuda = build_ffcv_loader(beton, batch_size=8, image_size=SIZE, device="cuda", seed=0, workers=2)
    on_cpu, on_cuda = _epoch(loader, 4), _epoch(cuda, 4)
    assert on_cuda[0].view_q.is_cuda and on_cuda[0].crop_q.is_cuda and on_cuda[0].label.is_cuda
    for a, b in zip(on_cpu, on_cuda):
        for name in ("view_q", "view_k", "crop_q", "crop_k", "index", "label"):
            assert torch.equal(getattr(a, name), getattr(b, name).cpu()), name


def test_cache_dir_receives_the_kernel_cache(tmp_path):
    ffcv_ops._cache_kernels_in(str(tmp_path))
    try:
        ffcv_ops._mirror(np.zeros((2, 4, 3), dtype=np.int16))  # a new signature: compiled and cached
        assert any(name.endswith(".nbi") for name in os.listdir(tmp_path / os.listdir(tmp_path)[0]))
    finally:
        for kernel in ffcv_ops._CACHED_KERNELS:
            kernel.enable_caching()  # back to the default place


# ---- loader: bad input

def test_bad_beton_paths_are_data_errors(beton, tmp_path, sample_root):
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(open(beton, "rb").read()[: os.path.getsize(beton) // 2])
    jpeg = tmp_path / "photo.beton"
    shutil.copy(list_images(sample_root).paths[0], jpeg)
    (tmp_path / "empty.beton").write_bytes(b"")
    cases = {str(tmp_path / "missing.beton"): "does not exist", str(tmp_path): "is a folder.*make ffcv DATA=",
             str(truncated): "truncated", str(jpeg): "not a readable FFCV",
             str(tmp_path / "empty.beton"): "0 bytes"}
    for path, match in cases.items():
        with pytest.raises(DataError, match=match):
            build_ffcv_loader(path, batch_size=2, image_size=SIZE, device="cpu")


@pytest.mark.parametrize("options, match", [
    (dict(batch_size=0), "batch_size"), (dict(image_size=0), "image_size"),
    (dict(rank=2, world_size=2), "rank"),
    (dict(crop_scale=(0.5, 0.2)), "crop_scale"), (dict(crop_ratio=(0, 1)), "crop_ratio"),
    (dict(flip_prob=2.0), "flip_prob"), (dict(order="sequential"), "order"), (dict(seed=-1), "seed"),
    (dict(order="quasi_random", world_size=2), "quasi_random"), (dict(batches_ahead=0), "batches_ahead"),
    (dict(interpolation="cubic"), "interpolation"), (dict(workers=10_000), "workers"),
])
def test_loader_rejects_bad_options(beton, options, match):
    with pytest.raises(ValueError, match=match):
        build_ffcv_loader(beton, **{"batch_size": 2, "image_size": SIZE, "device": "cpu", **options})


def test_a_dataset_smaller_than_a_global_batch_is_a_data_error(beton):
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_ffcv_loader(beton, batch_size=16, image_size=SIZE, device="cpu", world_size=2)


# ---- the conversion script

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "convert_imagenet_to_ffcv.sh")


def test_conversion_script_checks_its_arguments(tmp_path):
    usage = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")
    (tmp_path / "imagenet" / "train").mkdir(parents=True)  # no val
    missing = subprocess.run(["bash", SCRIPT, str(tmp_path / "imagenet"), str(tmp_path / "out")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "val is not a folder" in missing.stderr
    assert not (tmp_path / "out").exists()
