"""Smoke tests of the user-facing tools: `python -m maskco.bench` and `python -m maskco.show`."""
from __future__ import annotations

import json
import os

import pytest
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


class _CountingLoader:
    """A loader of ``size`` batches per epoch that counts its iterators (each one a DALI pipeline rebuild)."""

    def __init__(self, size: int):
        self.size, self.iterators, self.epochs = size, 0, []

    def __len__(self):
        return self.size

    def set_epoch(self, epoch, skip_batches=0):
        self.epochs.append(epoch)

    def __iter__(self):
        self.iterators += 1
        return iter(range(self.size))


def test_loader_figure_keeps_one_iterator_across_its_repeats():
    """A new iterator inside a measurement would time DALI's pipeline rebuild or the workers' restart: the
    batches per repeat are cut to what one epoch holds instead, and the row says how many were timed."""
    import torch

    from maskco.bench.timing import loader_rate

    consumed = []
    loader = _CountingLoader(size=8)
    row = loader_rate(loader, batches=5, batch_size=2, device=torch.device("cpu"), consume=consumed.append, repeats=3)
    assert loader.iterators == 1 and row["batches"] == 2 and row["repeats"] == 3
    assert consumed == list(range(7))  # one warm-up batch, then 3 x 2, all of one epoch


def test_graph_capture_check_flags_skips_and_missing_graphs():
    import torch

    from maskco.bench import capture

    rows = [{"figure": "step", "name": "ready+maskco graph-captured", "mode": "graphs", "cudagraph_skips": 0,
             "cuda_graphs": 2},
            {"figure": "e2e", "name": "torch graph-captured", "mode": "graphs", "cudagraph_skips": 1, "cuda_graphs": 2},
            {"figure": "step", "name": "x", "mode": "graphs", "cudagraph_skips": 0, "cuda_graphs": 0},
            {"figure": "step", "name": "ready+maskco compiled", "mode": "compiled"}]
    problems = capture.check(rows)
    assert len(problems) == 2 and "1 CUDA graph skips" in problems[0] and "0 graphs recorded" in problems[1]
    assert capture.skips() >= 0 and capture.recorded_graphs(torch.device("cpu")) == 0


def test_the_bench_runs_the_step_under_the_trainers_cuda_flags(monkeypatch):
    """TF32 and cuDNN autotuning are part of Inductor's cache key: the bench's step (maskco.build) sets the
    trainer's flags, so the two share one compile cache."""
    import torch

    from maskco import step
    from maskco.bench.figures import StepRunner
    from maskco.config import build_config

    seen, cuda_flags = [], step.cuda_flags
    monkeypatch.setattr(step, "cuda_flags", lambda device: seen.append(device))
    StepRunner(build_config([], base=dict(arch="resnet18", image_size=64, batch_size=2, box_min_size=8)),
               torch.device("cpu"))
    assert seen == [torch.device("cpu")]
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        cuda_flags(torch.device("cuda"))  # setting them needs no GPU
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = flags


def test_hw_decoder_load_reaches_the_dali_loader(monkeypatch):
    """--hw-decoder-load (0.65, DALI's A100-era default; 0.9 on an H100) is passed to the DALI loader, and its
    loader row records it."""
    import torch

    import pipelines
    from maskco.bench import figures
    from maskco.bench.__main__ import main
    from maskco.config import build_config

    seen = {}

    class Loader(_CountingLoader):
        def __iter__(self):
            return (pipelines.Batch(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))
                    for _ in super().__iter__())

        def close(self):
            pass

    def fake_build_loader(backend, source, **options):
        seen.update(options, backend=backend)
        return Loader(size=8)

    monkeypatch.setattr(pipelines, "build_loader", fake_build_loader)
    cfg = build_config([], base=dict(arch="resnet18", image_size=64, batch_size=2, box_min_size=8))
    rows = figures.backend_figures("dali", "src", cfg, torch.device("cpu"), 1, 1, 0, hw_decoder_load=0.9)
    assert next(rows)["hw_decoder_load"] == 0.9 and seen["backend"] == "dali" and seen["hw_decoder_load"] == 0.9
    with pytest.raises(SystemExit):
        main(["--hw-decoder-load=x"])


def test_a_killed_bench_keeps_the_rows_it_measured(tmp_path, sample_root):
    """Each row is written and flushed the moment it is measured: a bench killed by a stage's timeout leaves
    every finished figure in its JSON lines (it wrote them only at exit before)."""
    import signal
    import subprocess
    import sys
    import time

    jsonl = tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.Popen([sys.executable, "-m", "maskco.bench", *TINY_MODEL, "--backend=torch",
                             f"--data={sample_root}", f"--out-dir={tmp_path}", f"--jsonl={jsonl}", "--modes=eager",
                             "--config=cpu_demo"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # a bound on a hang, not a speed threshold
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.exists() and jsonl.read_text().count("\n") >= 1:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the bench ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert rows and rows[0]["figure"] == "step" and rows[0]["img_per_s"] > 0 and "torch" in rows[0]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graph_captured_step_replays_cuda_graphs_without_skips_on_cuda():
    """The graph-captured figure counts Inductor's CUDA-graph skips and the graphs recorded: a skip would make
    "graph-captured" time the compiled step without graphs (make bench-gpu runs this on a GPU)."""
    import torch

    from maskco.bench import capture
    from maskco.bench.figures import step_figures
    from maskco.config import build_config

    cfg = build_config([], base=dict(arch="resnet18", image_size=64, batch_size=4, box_min_size=8))
    row = next(step_figures(cfg, torch.device("cuda"), steps=2, repeats=1, modes=["graphs"]))
    assert row["mode"] == "graphs" and row["cudagraph_skips"] == 0 and row["cuda_graphs"] > 0
    assert capture.check([row]) == []
