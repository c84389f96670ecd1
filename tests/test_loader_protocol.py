"""Every backend's loader is a ``pipelines.Loader``: what the trainer, bench and evaluation rely on."""
from __future__ import annotations

import pytest

import pipelines


def _build(backend: str, source: str):
    return pipelines.build_loader(backend, source, batch_size=4, image_size=64, device="cpu", workers=1)


@pytest.mark.parametrize("backend", ["torch", "dali-cpu", "ffcv"])
def test_every_backend_is_a_loader(backend, sample_root, tmp_path):
    # the package's own check: find_spec("nvidia") finds torch's CUDA wheels (nvidia.cudnn, ...) without DALI
    reason = pipelines.available_backends()[backend]
    if reason:
        pytest.skip(reason)
    source = sample_root
    if backend == "ffcv":
        from pipelines.ffcv_writer import write_beton

        source = str(tmp_path / "sample.beton")
        write_beton(sample_root, source, workers=1, progress=False)
    loader = _build(backend, source)
    assert isinstance(loader, pipelines.Loader)
    assert len(loader) == 6 and loader.skipped == 0
    assert loader.fingerprint()["images"] == 24
    loader.set_epoch(0, skip_batches=5)
    assert len(list(loader)) == 1
    loader.close()


def test_the_fingerprint_names_the_data_not_its_mount(sample_root, tmp_path):
    import shutil

    moved = shutil.copytree(sample_root, str(tmp_path / "elsewhere"))
    assert _build("torch", moved).fingerprint() == _build("torch", sample_root).fingerprint()
