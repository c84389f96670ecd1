"""scripts/gpu_plan.py (run by scripts/gpu_check.sh): the GPU plan's budget, what a stage cut by its
timeout leaves, resuming on a warm machine, and the whole plan rehearsed on this CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_plan", os.path.join(ROOT, "scripts", "gpu_plan.py"))
gpu_plan = importlib.util.module_from_spec(_spec)
sys.modules["gpu_plan"] = gpu_plan  # its dataclasses look their module up
_spec.loader.exec_module(gpu_plan)

START_MINUTES = 2.5  # a cold machine's start (2-3 minutes of the device budget)


def _has_dali() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_the_plan_fits_the_device_budget_with_a_rerun_of_the_first_call():
    """Two calls of at most 8 minutes; with a cold start and a rerun of call 1 within 15 minutes; and the
    script's header says the same numbers as the plan (the timeout_s of each device call)."""
    header = open(os.path.join(ROOT, "scripts", "gpu_check.sh"), encoding="utf-8").read()
    timeouts = {int(call): int(seconds) for call, seconds in
                re.findall(r"gpu_check\.sh --call (\d) [^\n]*timeout_s=(\d+)", header)}
    assert set(timeouts) == {1, 2}
    for call, seconds in timeouts.items():
        assert gpu_plan.BUDGETS[call] < seconds <= 8 * 60  # the driver ends its call before the device does
    minutes = START_MINUTES + (2 * timeouts[1] + timeouts[2]) / 60
    assert minutes <= 15
    assert f"{minutes:.1f}" in header
    stages = gpu_plan.plan(False, "python3")
    assert [s.call for s in stages] == sorted(s.call for s in stages)  # torch only first, then DALI
    assert all(len({s.name for s in stages if s.call == c}) == len([s for s in stages if s.call == c]) for c in (1, 2))
    dali = [s.name for s in stages if any("dali" in " ".join(c) for c in s.commands)]
    assert all(gpu_plan.plan(False, "python3")[[s.name for s in stages].index(n)].call == 2 for n in dali)


def test_a_stage_cut_by_its_timeout_keeps_its_rows_and_says_where_it_stopped(tmp_path):
    child = ("import json, time\n"
             "for name in ('first', 'second'):\n"
             "    print(json.dumps({'figure': 'step', 'name': name, 'img_per_s': 1.0, 'min': 1.0, 'max': 1.0}))\n"
             "print('compiling the third', flush=True)\n"
             "time.sleep(60)\n")
    stage = gpu_plan.Stage("slow", 1, 3, "a test", [[sys.executable, "-u", "-c", child]])
    output = gpu_plan.Output(str(tmp_path), {"commit": "abc"})
    result = gpu_plan.run_stage(stage, output, seconds=100, env=dict(os.environ))
    assert result["status"] == "cut by its timeout" and result["rows"] == 2 and result["seconds"] < 30
    assert "row step second" in result["stopped_after"] and "compiling the third" in result["stopped_after"]
    rows = _rows(str(tmp_path / "rows.jsonl"))
    assert [r["name"] for r in rows] == ["first", "second"] and all(r["commit"] == "abc" for r in rows)
    assert "compiling the third" in (tmp_path / "log.txt").read_text()


def test_resume_reruns_only_the_unfinished_stages(tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    ok = ("import json; open(%r, 'a').write('{name}\\n'); "
          "print(json.dumps({{'figure': 'x', 'name': '{name}'}}))") % str(marker)
    fail = ok.format(name="two") + "; raise SystemExit(1)"
    stages = [gpu_plan.Stage("one", 1, 20, "", [[sys.executable, "-c", ok.format(name="one")]]),
              gpu_plan.Stage("two", 1, 20, "", [[sys.executable, "-c", fail]])]
    monkeypatch.setattr(gpu_plan, "plan", lambda rehearse, py: stages)
    monkeypatch.setattr(gpu_plan, "STATE", str(tmp_path / "state"))
    assert gpu_plan.run_call(1, str(tmp_path / "a"), True, 200, False, "abc", sys.executable) == 1
    assert gpu_plan.run_call(1, str(tmp_path / "b"), True, 200, True, "abc", sys.executable) == 1
    assert marker.read_text().split() == ["one", "two", "two"]
    rows = _rows(str(tmp_path / "b" / "rows.jsonl"))
    assert [(r["stage"], r["figure"], r.get("resumed", False)) for r in rows if r["figure"] != "stage"] == [
        ("one", "x", True), ("two", "x", False)]


def test_the_whole_plan_rehearses_on_this_cpu(tmp_path):
    """`bash scripts/gpu_check.sh --rehearse`: every stage of both calls, tiny sizes and CPU stand-ins, the
    same JSON rows and per-stage timeouts; the DALI parts are checked (or the check is skipped with a reason
    where neither parts nor DALI are here). The subprocess bound is on a hang, not a speed threshold."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT, "PY": sys.executable}
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--rehearse", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    printed = done.stdout
    assert done.returncode == 0, printed[-3000:] + done.stderr[-3000:]
    for call in (1, 2):
        folder = out / f"call{call}"
        assert sorted(os.listdir(folder)) == ["log.txt", "rows.jsonl", "summary.md"]
        rows = _rows(str(folder / "rows.jsonl"))
        stages = {r["name"]: r for r in rows if r["figure"] == "stage"}
        assert list(stages) == [s.name for s in gpu_plan.plan(True, sys.executable) if s.call == call]
        assert all(s["status"] == "ok" for s in stages.values()), stages
        assert all(r["commit"] and r["torch"] and r["rehearsal"] for r in rows)
        for name in stages:
            assert f"STAGE {name} ok" in printed
    rows = _rows(str(out / "call1" / "rows.jsonl")) + _rows(str(out / "call2" / "rows.jsonl"))
    measured = {(r["stage"], r["figure"], r.get("name")) for r in rows if r.get("img_per_s")}
    assert {("bench32", "step", "ready+maskco"), ("bench32", "step", "ready+maskco compiled"),
            ("bench32", "ready_synthetic", "boxes+augment+mask"), ("bench32", "e2e", "torch prefetch"),
            ("bench128", "step", "ready+maskco"), ("bench128", "e2e", "torch")} <= measured
    assert any(r["figure"] == "compile" for r in rows) and any(r["figure"] == "train" for r in rows)
    wheels = next(r for r in rows if r["stage"] == "dali" and r["figure"] != "stage")
    assert wheels["figure"] in ("wheels", "skipped"), wheels
    if wheels["figure"] == "wheels":
        assert wheels["parts"] >= 1 and wheels["fits_one_call_each"] and wheels["installed_version"]
    if _has_dali():
        assert ("bench128", "e2e", "dali-cpu") in measured and ("dali32", "loader", "dali-cpu") in measured
    assert "STAGE tests ok" in printed
