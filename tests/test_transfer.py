"""make transfer end to end on tiny data: every row, the same pretraining steps on both sets, resumable."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from maskco import transfer
from test_scenes import fake_fmnist  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_transfer_measures_every_arm_on_both_pretraining_sets(fake_fmnist, tmp_path, capsys):  # noqa: F811
    argv = ["--out-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--fmnist-dir", fake_fmnist,
            "--single-images", "256", "--scenes", "256", "24", "12", "--det-iterations", "2"]
    assert transfer.main(argv) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "runs" / transfer.RESULTS, encoding="utf-8") as handle:
        settings, *rows = [json.loads(line) for line in handle]
    assert settings["settings"] and settings["epochs_single"] == settings["epochs_scenes"] == 1
    assert [(r["method"], r["pretrain_data"]) for r in rows] == [
        ("random_init", "none"), ("mocov2", "single"), ("mocov2", "scenes"), ("maskco", "single"),
        ("maskco", "scenes"), ("supervised", "single"), ("supervised", "scenes")]
    for r in rows:
        assert {"det_ap", "det_ap50", "det_ap75", "per_seed"} <= set(r) and r["per_seed"][0]["seed"] == 0
    steps = {(r["method"], r["pretrain_data"]): r["pretrain_steps"] for r in rows}
    assert all(steps[(m, "single")] == steps[(m, "scenes")] == 1 for m in ("mocov2", "maskco", "supervised"))
    assert "MaskCo" in out and "scenes" in out and os.path.isfile(tmp_path / "runs" / transfer.FIGURE)
    # a second run reuses every finished stage: nothing is pretrained or fine-tuned again
    stamps = {name: os.stat(tmp_path / "runs" / name / "results.json").st_mtime_ns
              for name in os.listdir(tmp_path / "runs") if name.startswith("detect-")}
    assert transfer.main(argv) == 0
    assert all(os.stat(tmp_path / "runs" / name / "results.json").st_mtime_ns == stamp
               for name, stamp in stamps.items())


@pytest.mark.parametrize("argv, says", [(["--methods", "maskco,byol"], "byol"),
                                        (["--seeds", "a"], "--seeds"),
                                        (["--quality", "q", "--seeds", "0,1"], "one seed")])
def test_bad_arguments_are_one_line_and_exit_2(argv, says):
    result = subprocess.run([sys.executable, "-m", "maskco.transfer", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr
