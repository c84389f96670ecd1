"""The DALI backend: Batch contract, geometry, decode parity, sharding, resume, webdataset, bad input.

CPU-mode tests run wherever DALI is installed; GPU-mode tests (mixed decode) need CUDA. Each test
writes its own tiny dataset to tmp_path.
"""
import io
import math
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e .[dali])")

from maskco.boxes import sample_boxes  # noqa: E402
from pipelines import DataError, build_loader  # noqa: E402
from pipelines.dali_loader import build_dali_loader, tar_shards  # noqa: E402
from pipelines.sources import list_images  # noqa: E402
from tests.geometry import assert_same_source_region, coordinate_image, cut_view  # noqa: E402

SIZES = [(160, 120), (120, 160), (200, 150), (128, 128), (150, 100), (100, 170)]  # (W, H)
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (mixed decode)")


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image (smooth colour fields): JPEG keeps it close, unlike noise."""
    low = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((width, height), Image.BICUBIC)


def write_folder(root, count: int, classes: int = 2, maker=None) -> str:
    """ImageFolder of ``count`` JPEGs (quality 95), sizes cycling through SIZES."""
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        image = maker(width, height, i) if maker else smooth_image(width, height, i)
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"img{i:04d}.jpg"), quality=95)
    return str(root)


def coordinate_maker(width: int, height: int, i: int) -> Image.Image:
    return Image.fromarray(coordinate_image(height, width).permute(1, 2, 0).numpy())


def write_shards(folder, images: list[Image.Image], per_shard: int, labels: bool = True) -> list[str]:
    """Webdataset tars: sample i = <key>.jpg (+ <key>.cls = i)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for start in range(0, len(images), per_shard):
        path = os.path.join(folder, f"shard-{start // per_shard:03d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, len(images))):
                buffer = io.BytesIO()
                images[i].save(buffer, "JPEG", quality=95)
                members = [(f"s{i:05d}.jpg", buffer.getvalue())]
                members += [(f"s{i:05d}.cls", str(i).encode())] if labels else []
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def load(source, batch_size=4, image_size=32, **kwargs):
    return build_loader("dali-cpu", str(source), batch_size=batch_size, image_size=image_size, device="cpu",
                        **kwargs)


def pil_rgb(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # [3, H, W]


def check_recut(batches, source_of, image_size: int, gpu: bool = False) -> None:
    """Each view equals its source image re-cut with the reported window (PIL decode, torchvision resize)."""
    errors = []
    for batch in batches:
        for i in range(len(batch)):
            image = source_of(batch, i)
            for view, crop in ((batch.view_q[i], batch.crop_q[i]), (batch.view_k[i], batch.crop_k[i])):
                expected = cut_view(image, crop.cpu(), image_size).float()
                errors.append((view.cpu().float() - expected).abs().mean().item())
    # DALI's and torchvision's antialiased resamplers differ slightly (about 0.2 here); a window off by
    # one source pixel gives about 3, a wrong flip about 40. nvJPEG upsamples chroma differently.
    assert max(errors) < (2.0 if gpu else 1.0), max(errors)


def test_batch_contract(tmp_path):
    root = write_folder(tmp_path / "data", 12, classes=3)
    loader = load(root, batch_size=4, image_size=32, seed=1)
    images = list_images(root)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert batch.view_q.shape == batch.view_k.shape == (4, 3, 32, 32)
        assert batch.view_q.dtype == torch.uint8 and batch.crop_q.dtype == torch.float32
        for crop in (batch.crop_q, batch.crop_k):
            assert crop.shape == (4, 5)
            assert (crop[:, :4] >= 0).all() and (crop[:, :4] <= 1).all()
            assert (crop[:, 2] > crop[:, 0]).all() and (crop[:, 3] > crop[:, 1]).all()
            assert set(crop[:, 4].tolist()) <= {0.0, 1.0}
        assert batch.index.dtype == torch.int64 and batch.label.dtype == torch.int64
        assert batch.label.tolist() == [images.labels[i] for i in batch.index.tolist()]
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(12))


def test_views_are_the_reported_windows_of_the_decoded_image(tmp_path):
    root = write_folder(tmp_path / "data", 12)
    paths = list_images(root).paths
    loader = load(root, batch_size=4, image_size=48, seed=3, crop_scale=(0.1, 1.0))
    check_recut(list(loader), lambda batch, i: pil_rgb(paths[batch.index[i]]), 48)


def test_coordinate_images_through_sample_boxes(tmp_path):
    root = write_folder(tmp_path / "data", 8, maker=coordinate_maker)
    loader = load(root, batch_size=8, image_size=64, seed=0)
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            boxes = sample_boxes(batch.crop_q, batch.crop_k, 64, num_negatives=2, generator=generator)
            assert_same_source_region(batch.view_q, batch.view_k, boxes.masked, boxes.keys[:, 0],
                                      valid=boxes.valid, atol=0.01)
            checked += int(boxes.valid.sum())
    assert checked > 8


def test_decode_matches_pil(tmp_path):
    """Whole-image windows at the source size are the decoded image: compare with PIL (JPEG, grey, PNG)."""
    root = tmp_path / "data"
    root.mkdir()
    smooth_image(64, 64, 0).save(root / "colour.jpg", quality=90)
    smooth_image(64, 64, 1).convert("L").save(root / "grey.jpg", quality=90)
    rgba = smooth_image(64, 64, 2).convert("RGBA")
    rgba.save(root / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": ignored, as PIL's Image.open ignores it
    smooth_image(64, 64, 3).save(root / "rotated.jpg", quality=90, exif=exif)
    paths = list_images(str(root)).paths
    loader = load(root, batch_size=4, image_size=64, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                  flip_prob=0.0)
    (batch,) = list(loader)
    assert (batch.crop_q == torch.tensor([0, 0, 1, 1, 0.0])).all()
    for i in range(4):
        expected = pil_rgb(paths[batch.index[i]]).float()
        error = (batch.view_q[i].float() - expected).abs()
        # both are libjpeg-turbo (identical here); allow for another IDCT build
        assert error.mean() < 0.5 and error.max() <= 4, (paths[batch.index[i]], error.mean(), error.max())
        assert torch.equal(batch.view_q[i], batch.view_k[i])


def test_crop_distribution_matches_torchvision(tmp_path):
    from torchvision.transforms import RandomResizedCrop

    root = write_folder(tmp_path / "data", 24)
    loader = load(root, batch_size=8, image_size=8, seed=0)
    crops = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        crops += [torch.cat([b.crop_q, b.crop_k]) for b in loader]
    crops = torch.cat(crops).double()  # [1920, 5]
    area = (crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1])
    reference = []
    torch.manual_seed(0)
    for i in range(crops.shape[0]):
        width, height = SIZES[i % len(SIZES)]
        _, _, h, w = RandomResizedCrop.get_params(torch.empty(3, height, width), [0.2, 1.0], [3 / 4, 4 / 3])
        reference.append(w * h / (width * height))
    assert abs(area.mean().item() - float(np.mean(reference))) < 0.03
    assert 0.2 - 0.02 <= area.min() and area.max() <= 1
    assert abs(crops[:, 4].mean().item() - 0.5) < 0.05


def test_ranks_are_disjoint_cover_the_epoch_and_match_the_torch_backend(tmp_path):
    root = write_folder(tmp_path / "data", 22)
    per_rank = {}
    for rank in range(2):
        loader = load(root, batch_size=4, rank=rank, world_size=2, seed=5)
        assert len(loader) == 2  # 22 // (4 x 2)
        loader.set_epoch(1)
        per_rank[rank] = [b.index.tolist() for b in loader]
    seen_0 = {i for step in per_rank[0] for i in step}
    seen_1 = {i for step in per_rank[1] for i in step}
    assert not seen_0 & seen_1 and len(seen_0) == len(seen_1) == 8
    order = np.random.default_rng([5, 1]).permutation(22)[:16]  # the epoch's samples, step-major
    assert seen_0 | seen_1 == set(order.tolist())
    torch_loader = pytest.importorskip("pipelines.torch_loader")
    sampler = torch_loader.ResumableBatchSampler(22, 4, 1, 2, 5)
    sampler.set_epoch(1)
    assert [[i for _, i in step] for step in sampler] == per_rank[1]


def test_epochs_differ_and_resume_sees_the_same_samples(tmp_path):
    root = write_folder(tmp_path / "data", 16)
    loader = load(root, batch_size=4, seed=2)
    loader.set_epoch(0)
    epoch_0 = [b.index.tolist() for b in loader]
    loader.set_epoch(1)
    epoch_1 = [b.index.tolist() for b in loader]
    assert epoch_0 != epoch_1 and sorted(sum(epoch_0, [])) == sorted(sum(epoch_1, [])) == list(range(16))
    resumed = build_dali_loader(root, batch_size=4, image_size=32, device=torch.device("cpu"), seed=2)
    resumed.set_epoch(1, skip_batches=2)
    assert [b.index.tolist() for b in resumed] == epoch_1[2:]
    for _ in loader:  # stopping early frees the pipeline; the next iteration starts afresh
        break
    assert [b.index.tolist() for b in loader] == epoch_1


def test_list_and_relative_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_folder("data", 8, classes=2)
    odd = os.path.join("data", "class1", "odd\nname.jpg")  # a newline: DALI's list file cannot hold it
    smooth_image(64, 48, 99).save(odd, quality=95)
    with open("list.txt", "w") as handle:
        handle.write("# relative to the list's folder, with labels\n")
        handle.writelines(f"data/class0/img{i:04d}.jpg {10 + i}\n" for i in range(0, 8, 2))
    (batch,) = list(load("list.txt", batch_size=4))
    assert sorted(batch.label.tolist()) == [10, 12, 14, 16]
    batches = list(load("data", batch_size=3))  # a relative folder; 9 images
    names = {list_images("data").paths[i] for b in batches for i in b.index.tolist()}
    assert len(batches) == 3 and odd in names


def test_webdataset_shards(tmp_path):
    images = [coordinate_maker(*SIZES[i % len(SIZES)], i) for i in range(24)]
    paths = write_shards(tmp_path / "wds", images, per_shard=5)
    per_rank = {}
    for rank in range(2):
        loader = load(tmp_path / "wds", batch_size=4, image_size=32, rank=rank, world_size=2, seed=1)
        assert len(loader) == 3
        batches = list(loader)
        assert all(b.index is None for b in batches)
        check_recut(batches, lambda batch, i: coordinate_image(*SIZES[batch.label[i] % len(SIZES)][::-1]), 32)
        per_rank[rank] = {int(i) for b in batches for i in b.label}
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == set(range(24))
    assert tar_shards(str(tmp_path / "wds" / "shard-{000..004}.tar")) == paths
    assert tar_shards(str(tmp_path / "wds" / "*.tar")) == paths == tar_shards(str(tmp_path / "wds"))
    unlabelled = write_shards(tmp_path / "plain", images[:8], per_shard=8, labels=False)
    (batch,) = list(load(unlabelled[0], batch_size=8))
    assert batch.label.tolist() == [-1] * 8


def test_webdataset_resume_is_exact(tmp_path):
    write_shards(tmp_path / "wds", [smooth_image(64, 48, i) for i in range(16)], per_shard=6)
    loader = load(tmp_path / "wds", batch_size=4, seed=4)
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, skip_batches=2)
    resumed = list(loader)
    assert len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a.label, b.label) and torch.equal(a.view_q, b.view_q)
        assert torch.equal(a.crop_k, b.crop_k)


def break_files(root) -> tuple[str, str]:
    """Replace two JPEGs of a folder: one truncated, one that is text. Returns their paths."""
    paths = list_images(str(root)).paths
    truncated, text = paths[3], paths[6]
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as handle:
        handle.write(data[: len(data) // 3])
    with open(text, "w") as handle:
        handle.write("not an image\n" * 20)
    return truncated, text


def test_bad_images_are_replaced_and_counted(tmp_path):
    root = write_folder(tmp_path / "data", 16)
    truncated, text = break_files(root)
    loader = load(root, batch_size=4, seed=0)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = list(loader)
    assert len(batches) == len(loader) == 4
    paths = list_images(root).paths
    seen = {paths[i] for b in batches for i in b.index.tolist()}
    assert truncated not in seen and text not in seen
    assert loader.skipped == 2 and {p for p, _ in loader.skipped_paths} == {truncated, text}
    loader.set_epoch(1)
    assert len(list(loader)) == 4 and loader.skipped == 4  # known now: replaced without a failure


@pytest.mark.parametrize("broken", ["truncated", "text"])
def test_bad_image_strict_names_the_file(tmp_path, broken):
    root = write_folder(tmp_path / "data", 16)
    truncated, text = break_files(root)
    os.remove(text if broken == "truncated" else truncated)
    loader = load(root, batch_size=4, seed=0, strict_data=True)
    with pytest.raises(DataError, match=truncated if broken == "truncated" else text):
        list(loader)


def test_bad_webdataset_member_names_it(tmp_path):
    images = [smooth_image(64, 48, i) for i in range(12)]
    (path,) = write_shards(tmp_path / "wds", images, per_shard=12)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = b"garbage" * 50 if member.name == "s00007.jpg" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(DataError, match="s00007.jpg"):
        list(load(path, batch_size=4))


def test_bad_sources_fail_fast_with_the_path(tmp_path):
    for source in [tmp_path / "missing", tmp_path / "missing.tar", tmp_path / "shard-{0..3}.tar"]:
        with pytest.raises(DataError, match=str(tmp_path)):
            load(source)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load(tmp_path / "empty")
    with pytest.raises(DataError, match="matches no files"):
        load(tmp_path / "*.tar")
    root = write_folder(tmp_path / "small", 3)
    with pytest.raises(DataError, match="fewer than one global batch"):
        load(root, batch_size=4)


@pytest.mark.parametrize("name, value", [("batch_size", 0), ("image_size", 0), ("rank", 2), ("flip_prob", 1.5),
                                         ("crop_scale", (0.5, 0.2)), ("crop_ratio", (0, 1)),
                                         ("prefetch", 0)])
def test_bad_arguments_name_the_argument(tmp_path, name, value):
    root = write_folder(tmp_path / "data", 8)
    kwargs = dict(batch_size=4, image_size=32, rank=0, world_size=2, flip_prob=0.5, prefetch=2)
    with pytest.raises(ValueError, match=name):
        build_dali_loader(root, device=torch.device("cpu"), **{**kwargs, name: value})
    with pytest.raises(ValueError, match="cpu_only"):
        build_dali_loader(root, device=torch.device("cpu"), batch_size=4, image_size=32, cpu_only=False)


# ---- GPU mode: nvJPEG / hardware decode, same checks


@GPU
def test_gpu_views_are_the_reported_windows(tmp_path):
    root = write_folder(tmp_path / "data", 12)
    paths = list_images(root).paths
    loader = build_loader("dali", root, batch_size=4, image_size=48, device="cuda", seed=3)
    batches = list(loader)
    assert len(batches) == 3
    assert all(b.view_q.is_cuda and b.crop_q.is_cuda and b.index.is_cuda for b in batches)
    check_recut(batches, lambda batch, i: pil_rgb(paths[batch.index[i]]), 48, gpu=True)


@GPU
def test_cpu_decode_delivers_to_the_gpu(tmp_path):
    root = write_folder(tmp_path / "data", 8)
    (batch,) = list(build_loader("dali-cpu", root, batch_size=8, image_size=32, device="cuda"))
    assert batch.view_q.is_cuda and batch.crop_k.is_cuda and batch.label.is_cuda


@GPU
def test_gpu_coordinate_images_and_decode_parity(tmp_path):
    root = write_folder(tmp_path / "coords", 8, maker=coordinate_maker)
    loader = build_loader("dali", root, batch_size=8, image_size=64, device="cuda", seed=0)
    for batch in loader:
        boxes = sample_boxes(batch.crop_q, batch.crop_k, 64, num_negatives=2)
        assert_same_source_region(batch.view_q.cpu(), batch.view_k.cpu(), boxes.masked.cpu(),
                                  boxes.keys[:, 0].cpu(), valid=boxes.valid.cpu(), atol=0.02)
    root = write_folder(tmp_path / "squares", 4, maker=lambda w, h, i: smooth_image(64, 64, i))
    paths = list_images(root).paths
    loader = build_loader("dali", root, batch_size=4, image_size=64, device="cuda", crop_scale=(1.0, 1.0),
                          crop_ratio=(1.0, 1.0), flip_prob=0.0)
    (batch,) = list(loader)
    for i in range(4):  # nvJPEG upsamples chroma differently from libjpeg: a looser bound than on the CPU
        error = (batch.view_q[i].cpu().float() - pil_rgb(paths[batch.index[i]]).float()).abs()
        assert error.mean() < 2.0 and not math.isnan(error.mean())
