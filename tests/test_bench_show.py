"""Smoke tests of the user-facing tools: `python -m maskco.bench` and `python -m maskco.show`."""
from __future__ import annotations

import json
import os

from PIL import Image

from maskco import bench, show

TINY_MODEL = ["--arch=resnet18", "--image-size=64", "--batch-size=4", "--threads=1", "--batches=1", "--steps=1",
              "--repeats=1"]


def test_bench_reports_every_figure_positive(tmp_path, sample_root, capsys):
    out_dir = str(tmp_path / "bench")
    assert bench.main([*TINY_MODEL, "--backend=torch,no-such-backend", f"--data={sample_root}",
                       f"--out-dir={out_dir}", "--skip=roi"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "bench.jsonl"), encoding="utf-8")]
    measured = {(r["figure"], r["name"]): r for r in rows if "img_per_s" in r}
    expected = {("decode", "decode"), ("baseline", "baseline"), ("loader", "torch"), ("ready", "torch"),
                ("e2e", "torch"), ("step", "MaskCo"), ("step", "MaskCo (mph=none)"),
                ("step", "MoCo v2-like (mph=attn)"), ("step", "MoCo v2"), ("ready_synthetic", "boxes+augment+mask"), ("step", "ready+maskco"), ("method_only", "boxes+mask+roi_pool+logits")}
    assert expected <= set(measured)
    assert all(measured[key]["img_per_s"] > 0 for key in expected)
    assert 0 <= measured["e2e", "torch"]["data_wait"] <= 1
    assert all(key in rows[0] for key in ("machine", "cpu", "threads", "torch", "git"))
    assert any(r["figure"] == "targets" for r in rows)
    assert Image.open(os.path.join(out_dir, "bench.png")).size[0] > 100
    printed = capsys.readouterr().out
    assert "skipped no-such-backend" in printed  # a missing backend is reported, not a crash


def test_bench_skips_unavailable_optional_backends_with_a_reason(monkeypatch, tmp_path, sample_root, capsys):
    import pipelines

    monkeypatch.setattr(pipelines, "available_backends", lambda: {"ffcv": "No module named 'ffcv'; install it"})
    assert bench.main([*TINY_MODEL, "--backend=ffcv", f"--data={sample_root}", f"--out-dir={tmp_path}",
                       "--skip=decode,baseline,step,roi"]) == 0
    assert "skipped ffcv: No module named 'ffcv'" in capsys.readouterr().out


def test_show_writes_a_grid(tmp_path, sample_root):
    out = str(tmp_path / "views.png")
    assert show.main([f"--data={sample_root}", "--arch=resnet18", "--image_size=64", "--box_min_size=8",
                      f"--out={out}", "--images=3"]) == 0
    image = Image.open(out)
    assert image.size == (3 * 64 + 8, 3 * (64 + 4))
