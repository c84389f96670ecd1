"""Smoke tests of the user-facing tools: `python -m maskco.bench` and `python -m maskco.show`."""
from __future__ import annotations

import json
import os

from PIL import Image

from maskco import show
from maskco.bench import micro
from maskco.bench.__main__ import main as bench_main

TINY_MODEL = ["--arch=resnet18", "--image-size=64", "--batch-size=4", "--threads=1", "--batches=1", "--steps=1",
              "--repeats=1"]


def test_bench_reports_every_figure_positive(tmp_path, sample_root, capsys):
    out_dir = str(tmp_path / "bench")
    # aot_eager: the compiled mode's graphs without Inductor's code generation (minutes on 2 cores)
    assert bench_main([*TINY_MODEL, "--backend=torch,no-such-backend", f"--data={sample_root}",
                       f"--out-dir={out_dir}", "--skip=roi", "--modes=eager,compiled",
                       "--compile-backend=aot_eager"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "bench.jsonl"), encoding="utf-8")]
    measured = {(r["figure"], r["name"]): r for r in rows if "img_per_s" in r}
    expected = {("decode", "decode"), ("baseline", "baseline"), ("loader", "torch"), ("ready", "torch"),
                ("e2e", "torch compiled"), ("e2e", "torch prefetch compiled"), ("step", "MaskCo"),
                ("step", "MaskCo (mph=none)"),
                ("step", "MoCo v2-like (mph=attn)"), ("step", "MoCo v2"), ("ready_synthetic", "boxes+augment+mask"),
                ("step", "ready+maskco"), ("step", "ready+maskco compiled"),
                ("method_only", "boxes+mask+roi_pool+logits")}
    assert expected <= set(measured)
    assert all(measured[key]["img_per_s"] > 0 for key in expected)
    assert 0 <= measured["e2e", "torch compiled"]["data_wait"] <= 1
    assert measured["step", "ready+maskco compiled"]["warmup_s"] > 0
    printed_targets = next(r for r in rows if r["figure"] == "targets")["lines"]
    assert any(line.startswith("ready+maskco compiled / eager = ") for line in printed_targets)
    assert any(line.startswith("e2e torch prefetch compiled / ") for line in printed_targets)
    assert all(key in rows[0] for key in ("machine", "cpu", "threads", "torch", "git"))
    assert any(r["figure"] == "targets" for r in rows)
    assert Image.open(os.path.join(out_dir, "bench.png")).size[0] > 100
    assert not any("img_per_s" in r for r in rows if r["figure"] in ("micro", "skipped"))
    printed = capsys.readouterr().out
    assert "skipped no-such-backend" in printed  # a missing backend is reported, not a crash


def test_bench_skips_unavailable_optional_backends_with_a_reason(monkeypatch, tmp_path, sample_root, capsys):
    import pipelines

    monkeypatch.setattr(pipelines, "available_backends", lambda: {"ffcv": "No module named 'ffcv'; install it"})
    assert bench_main([*TINY_MODEL, "--backend=ffcv", f"--data={sample_root}", f"--out-dir={tmp_path}",
                       "--skip=decode,baseline,step,roi"]) == 0
    assert "skipped ffcv: No module named 'ffcv'" in capsys.readouterr().out


def test_show_writes_a_grid(tmp_path, sample_root):
    out = str(tmp_path / "views.png")
    assert show.main([f"--data={sample_root}", "--arch=resnet18", "--image_size=64", "--box_min_size=8",
                      f"--out={out}", "--images=3"]) == 0
    image = Image.open(out).convert("L")
    side = 64 * 3  # 64 px views are enlarged 3x (show.MIN_SIDE)
    assert image.size == (3 * side + 2 * show.GAP, show.HEADER + 3 * (side + show.GAP) + show.FOOTER)
    title, key = image.crop((0, 0, image.width, show.HEADER)), image.crop((0, image.height - show.FOOTER, image.width,
                                                                            image.height))
    assert title.getextrema()[0] < 100 and key.getextrema()[0] < 100  # column titles and the colour key are drawn


def test_timing_warms_up_then_interleaves_the_timed_calls():
    import torch

    from maskco.bench import timing

    calls = []
    seconds = timing.call_seconds([lambda: calls.append("a"), lambda: calls.append("b")], torch.device("cpu"),
                                  repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(s) for s in seconds] == [3, 3] and all(s >= 0 for s in seconds[0] + seconds[1])
    assert timing.spread([3.0, 1.0, 2.0], "img_per_s") == {"img_per_s": 2.0, "min": 1.0, "max": 3.0, "repeats": 3}


def test_micro_benchmarks_report_latencies_not_rates():
    rows = micro.run("cpu", repeats=1)
    assert {row["impl"] for row in rows} == {"fused", "reference"}
    assert all(row["ms_per_call"] > 0 and row["unit"] == "ms per call" and "img_per_s" not in row for row in rows)
    assert all(row["speedup"] > 0 for row in rows if row["impl"] == "fused" and "roi_pool" in row["group"])
    assert "median ms" in micro.format_table(rows)


def test_decode_ceiling_leaves_torch_threads_as_they_were(sample_root):
    """It times decoding with one intra-op thread per decode thread, then must give the rest of the bench
    (and of a test session) back the threads it had, not the decode thread count."""
    import torch

    from maskco.bench.baselines import decode_ceiling
    from pipelines.sources import list_images

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        decode_ceiling(list_images(sample_root).paths[:4], threads=1, device=torch.device("cpu"), repeats=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
