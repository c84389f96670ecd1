"""scripts/gpu_plan.py (`make bench-gpu`, i.e. scripts/gpu_check.sh): the plan its header describes, what a
stage cut by its time limit leaves, a stage skipped for a missing part, resume, the refusal without a GPU,
and the whole plan rehearsed on this CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_plan", os.path.join(ROOT, "scripts", "gpu_plan.py"))
gpu_plan = importlib.util.module_from_spec(_spec)
sys.modules["gpu_plan"] = gpu_plan  # its dataclasses look their module up
_spec.loader.exec_module(gpu_plan)


def _has_dali() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_the_header_and_make_describe_the_plan(tmp_path):
    """One run: unique stage names, each named in gpu_check.sh's header with the total of the time limits;
    the DALI stages say they need DALI; `make bench-gpu` runs the script."""
    header = open(os.path.join(ROOT, "scripts", "gpu_check.sh"), encoding="utf-8").read()
    stages = gpu_plan.plan(False, "python3", str(tmp_path))
    names = [s.name for s in stages]
    assert len(set(names)) == len(names) and names[0] == "env" and names[-1] == "tests"
    assert all(re.search(rf"\b{name}:", header) for name in names), names
    minutes = round(sum(s.timeout for s in stages) / 60)
    assert f"at most {minutes} min together" in header
    needs_dali = {s.name for s in stages if s.needs == "nvidia.dali"}
    assert needs_dali == {s.name for s in stages if all("--backend=dali" in c for c in s.commands)} != set()
    made = subprocess.run(["make", "-n", "bench-gpu", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert "bash scripts/gpu_check.sh" in made.stdout


def test_a_stage_cut_by_its_time_limit_keeps_its_rows_and_says_where_it_stopped(tmp_path):
    child = ("import json, time\n"
             "for name in ('first', 'second'):\n"
             "    print(json.dumps({'figure': 'step', 'name': name, 'img_per_s': 1.0, 'min': 1.0, 'max': 1.0}))\n"
             "print('compiling the third', flush=True)\n"
             "time.sleep(60)\n")
    stage = gpu_plan.Stage("slow", 3, "a test", [[sys.executable, "-u", "-c", child]])
    output = gpu_plan.Output(str(tmp_path), {"commit": "abc"})
    result = gpu_plan.run_stage(stage, output, env=dict(os.environ))
    assert result["status"] == "cut by its time limit" and result["rows"] == 2 and result["seconds"] < 30
    assert "row step second" in result["stopped_after"] and "compiling the third" in result["stopped_after"]
    rows = _rows(tmp_path / "rows.jsonl")
    assert [r["name"] for r in rows] == ["first", "second"] and all(r["commit"] == "abc" for r in rows)
    assert "compiling the third" in (tmp_path / "log.txt").read_text()


def _fake_plan(monkeypatch, tmp_path, stages):
    monkeypatch.setattr(gpu_plan, "plan", lambda rehearse, py, out: stages)
    monkeypatch.setattr(gpu_plan, "data_dir", lambda rehearse: str(tmp_path))
    (tmp_path / "list.txt").write_text("")


def test_resume_reruns_only_the_unfinished_stages(tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    ok = ("import json; open(%r, 'a').write('{name}\\n'); "
          "print(json.dumps({{'figure': 'x', 'name': '{name}'}}))") % str(marker)
    fail = ok.format(name="two") + "; raise SystemExit(1)"
    _fake_plan(monkeypatch, tmp_path, [gpu_plan.Stage("one", 20, "", [[sys.executable, "-c", ok.format(name="one")]]),
                                       gpu_plan.Stage("two", 20, "", [[sys.executable, "-c", fail]])])
    out = str(tmp_path / "out")
    assert gpu_plan.run_plan(out, True, False, "abc", sys.executable) == 1
    assert gpu_plan.run_plan(out, True, True, "abc", sys.executable) == 1
    assert marker.read_text().split() == ["one", "two", "two"]
    rows = _rows(os.path.join(out, "rows.jsonl"))  # this run's rows only, the finished stage's replayed
    assert [(r["stage"], r["figure"], r.get("resumed", False)) for r in rows if r["figure"] != "stage"] == [
        ("one", "x", True), ("two", "x", False)]
    assert [(r["name"], r["status"], r.get("resumed", False)) for r in rows if r["figure"] == "stage"] == [
        ("one", "ok", True), ("two", "failed", False)]
    assert gpu_plan.run_plan(out, True, False, "abc", sys.executable) == 1  # without --resume: all again
    assert marker.read_text().split() == ["one", "two", "two", "one", "two"]


def test_a_stage_whose_part_is_missing_is_skipped_with_the_reason(tmp_path, monkeypatch):
    ok = [sys.executable, "-c", "print('ran')"]
    _fake_plan(monkeypatch, tmp_path, [gpu_plan.Stage("one", 20, "", [ok]),
                                       gpu_plan.Stage("dali", 20, "", [ok], needs="nvidia.dali_not_here")])
    out = tmp_path / "out"
    assert gpu_plan.run_plan(str(out), True, False, "abc", sys.executable) == 0
    stages = {r["name"]: r for r in _rows(out / "rows.jsonl") if r["figure"] == "stage"}
    assert stages["one"]["status"] == "ok" and stages["dali"]["status"] == "skipped"
    assert "make venv EXTRAS=dev,dali" in stages["dali"]["reason"]
    assert "skipped: DALI is not installed" in (out / "summary.md").read_text()
    assert gpu_plan.missing("no_such_package.part") == "no_such_package.part is not installed"
    assert gpu_plan.missing("json") == gpu_plan.missing("") == ""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the env stage imports torch")
def test_without_a_gpu_the_run_stops_after_the_environment_and_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the run would measure it")
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--out", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PY": sys.executable}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA device here" in done.stderr and "--rehearse" in done.stderr
    assert [r["name"] for r in _rows(tmp_path / "rows.jsonl") if r["figure"] == "stage"] == ["env"]


def test_the_whole_plan_rehearses_on_this_cpu(tmp_path):
    """`bash scripts/gpu_check.sh --rehearse`: every stage, tiny sizes and CPU stand-ins, the same JSON rows
    and per-stage time limits; the DALI stages run DALI's CPU mode (or are skipped with the reason where DALI
    is not installed). The subprocess bound is on a hang, not a speed threshold."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT, "PY": sys.executable}
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--rehearse", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    printed = done.stdout
    assert done.returncode == 0, printed[-3000:] + done.stderr[-3000:]
    assert {"log.txt", "rows.jsonl", "summary.md", "stages.json"} <= set(os.listdir(out))
    rows = _rows(out / "rows.jsonl")
    stages = {r["name"]: r for r in rows if r["figure"] == "stage"}
    assert list(stages) == [s.name for s in gpu_plan.plan(True, sys.executable, str(out))]
    dali = {"ok"} if _has_dali() else {"skipped"}
    assert all(s["status"] == "ok" or (s["status"] in dali and "dali" in name) for name, s in stages.items()), stages
    assert all(r["commit"] and r["torch"] and r["rehearsal"] for r in rows)
    for name, stage in stages.items():
        assert f"STAGE {name} {stage['status']}" in printed
    measured = {(r["stage"], r["figure"], r.get("name")) for r in rows if r.get("img_per_s")}
    assert {("bench32", "step", "ready+maskco"), ("bench32", "step", "ready+maskco compiled"),
            ("bench32", "ready_synthetic", "boxes+augment+mask"), ("bench32", "e2e", "torch prefetch"),
            ("bench128", "step", "ready+maskco"), ("bench128", "e2e", "torch")} <= measured
    assert any(r["figure"] == "compile" for r in rows) and any(r["figure"] == "train" for r in rows)
    if _has_dali():
        assert ("bench128", "e2e", "dali-cpu") in measured and ("dali32", "loader", "dali-cpu") in measured
    assert "STAGE tests ok" in printed and "| stage | status |" in printed  # the summary, printed
