"""A damaged checkpoint never costs a good one: keep-k counts only files that verify, and a damaged file
is moved aside (``*.damaged``), named once, never counted."""
from __future__ import annotations

import os

import pytest
import torch

from maskco import checkpoint
from maskco.train import main
from tests.test_train import TINY, records


def state(step: int) -> dict:
    return {"format": checkpoint.FORMAT, "step": step, "weights": torch.full((1000,), float(step))}


def step_file(folder, step: int) -> str:
    return os.path.join(folder, f"checkpoint_step{step:08d}.pt")


def damage(path: str, how: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        if how == "truncate":
            handle.truncate(100)
        elif how == "bit_flip":  # in the tensor data, past the zip headers
            handle.seek(size // 2)
            byte = handle.read(1)[0]
            handle.seek(size // 2)
            handle.write(bytes([byte ^ 0x10]))
        else:  # zero_fill: the size kept, the content gone
            handle.write(b"\0" * size)


def good_steps(folder) -> list[int]:
    """Steps of the checkpoint files in ``folder`` that verify, oldest first."""
    found = []
    for path, sha256 in checkpoint.Store(str(folder)).candidates():
        found.append(checkpoint.load(path, sha256)["step"])
    return sorted(found)


@pytest.mark.parametrize("how", ["truncate", "bit_flip", "zero_fill"])
def test_a_damaged_newest_checkpoint_never_costs_a_good_one(tmp_path, how):
    store = checkpoint.Store(str(tmp_path), keep=2)
    for step in (5, 10):
        store.save(state(step), step)
    damage(step_file(tmp_path, 10), how)
    warnings = []
    resumed = checkpoint.Store(str(tmp_path), keep=2, warn=warnings.append)  # the next run
    path, loaded = resumed.load_latest()
    assert loaded["step"] == 5 and os.path.samefile(path, os.path.join(tmp_path, checkpoint.LAST))
    for step in (7, 8):
        resumed.save(state(step), step)
        assert len(good_steps(tmp_path)) == 2  # every file left verifies, and two are left
    assert good_steps(tmp_path) == [7, 8]
    assert os.path.exists(step_file(tmp_path, 10) + ".damaged")
    assert len(warnings) == 1 and step_file(tmp_path, 10) in warnings[0] and "moved aside" in warnings[0]


def test_a_damaged_file_between_good_ones_is_not_counted_as_kept(tmp_path):
    store = checkpoint.Store(str(tmp_path), keep=3)
    for step in (5, 10, 15):
        store.save(state(step), step)
    damage(step_file(tmp_path, 10), "bit_flip")
    checkpoint.Store(str(tmp_path), keep=3).save(state(20), 20)  # a new process: it checks what it keeps
    assert good_steps(tmp_path) == [5, 15, 20]


def test_the_trainer_resumes_past_a_damaged_checkpoint_and_keeps_two_good_ones(tmp_path, sample_root):
    out_dir = str(tmp_path / "run")
    run = [*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--ckpt_every=2", "--export=false"]
    assert main([*run, "--max_steps=4"]) == 0  # checkpoints at steps 2 and 4
    damage(step_file(out_dir, 4), "truncate")
    assert main([*run, "--max_steps=3"]) == 0  # falls back to step 2, saves step 3
    assert good_steps(out_dir) == [2, 3]
    assert main([*run, "--max_steps=4"]) == 0  # the next run hears nothing more of the damaged file
    assert good_steps(out_dir) == [3, 4]
    warnings = [r["warning"] for r in records(out_dir) if "damaged" in r.get("warning", "")]
    assert len(warnings) == 1 and step_file(out_dir, 4) + ".damaged" in warnings[0]
