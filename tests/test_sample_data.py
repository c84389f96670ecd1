"""The sample-data generator: deterministic bytes, reuse of a complete dataset, a valid ImageFolder."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os

import pytest
from PIL import Image

from pipelines.sample_data import MANIFEST, SOURCES, main, make_sample_data
from pipelines.sources import list_images

SMALL = dict(num_images=10, num_classes=3, size=(64, 48))


def digests(root: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def test_same_arguments_give_byte_identical_files(tmp_path):
    a = digests(make_sample_data(str(tmp_path / "a"), seed=3, **SMALL))
    b = digests(make_sample_data(str(tmp_path / "b"), seed=3, **SMALL))
    assert a == b and len(a) == 10 + 1  # the images and the manifest
    other = digests(make_sample_data(str(tmp_path / "c"), seed=4, **SMALL))
    assert other.keys() == a.keys() and all(other[k] != a[k] for k in a if k != MANIFEST)


def test_sample_root_is_an_imagefolder_of_varied_jpegs(sample_root):
    images = list_images(sample_root)
    assert images.classes == sorted(name for name, _ in SOURCES[:3])
    assert len(images) == 24 and sorted(images.labels) == sorted([0, 1, 2] * 8)
    sizes = set()
    for path in images.paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
    assert (200, 150) in sizes and (150, 200) in sizes  # landscape and portrait
    assert len(sizes) >= 4  # some images are scaled


def test_complete_dataset_is_reused_and_changed_arguments_rebuild(tmp_path):
    root = make_sample_data(str(tmp_path / "data"), **SMALL)
    manifest = os.path.join(root, MANIFEST)
    stamp = os.stat(manifest).st_mtime_ns
    assert make_sample_data(root, **SMALL) == root
    assert os.stat(manifest).st_mtime_ns == stamp  # nothing rewritten

    make_sample_data(root, **{**SMALL, "num_images": 6})
    assert len(list_images(root)) == 6
    with open(manifest, encoding="utf-8") as handle:
        assert json.load(handle)["params"]["num_images"] == 6

    first = list_images(root).paths[0]
    os.remove(first)  # an incomplete dataset is rebuilt, not reused
    make_sample_data(root, **{**SMALL, "num_images": 6})
    assert os.path.isfile(first)


def test_refuses_to_overwrite_other_files(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="not empty"):
        make_sample_data(str(foreign), **SMALL)
    root = make_sample_data(str(tmp_path / "data"), **SMALL)
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        make_sample_data(root, **{**SMALL, "seed": 1})
    assert (tmp_path / "data" / "notes.txt").exists() and len(list_images(root)) == 10
    assert sorted(os.listdir(tmp_path)) == ["data", "photos"]  # no staging folder left behind


def test_concurrent_writers_agree(tmp_path):
    """Two processes (say, two ranks) making the same dataset at once both get the complete one."""
    context = multiprocessing.get_context("fork")
    target = str(tmp_path / "data")
    workers = [context.Process(target=make_sample_data, args=(target,), kwargs=SMALL) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert digests(target) == digests(make_sample_data(str(tmp_path / "alone"), **SMALL))
    assert sorted(os.listdir(tmp_path)) == ["alone", "data"]


@pytest.mark.parametrize("argument, options", [
    ("num_classes", {"num_classes": len(SOURCES) + 1}), ("num_images", {"num_images": 2}),
    ("seed", {"seed": -1}), ("size", {"size": (8, 48)})])
def test_bad_arguments_name_the_argument(tmp_path, argument, options):
    with pytest.raises(ValueError, match=argument):
        make_sample_data(str(tmp_path / "data"), **{**SMALL, **options})


def test_command_line(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--images", "4", "--classes", "2", "--seed", "1", "--size", "64", "48"])
    root = capsys.readouterr().out.strip()
    assert root == str(tmp_path / "cli") and len(list_images(root)) == 4
    assert digests(root) == digests(make_sample_data(str(tmp_path / "api"), 4, 2, 1, (64, 48)))
