"""The trainer on a bad day, as clusters deliver it: signals to the process group, torchrun restarts,
damaged or stale files, a full disk, divergence, and a resume on other data or another global batch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from maskco import atomic_file, checkpoint
from maskco.train import EXIT_DIVERGED, main
from pipelines.sample_data import make_sample_data
from tests.test_train import ROOT, TINY, losses, records


def _command(data: str, out_dir: str, *extra: str, ranks: int = 1, restarts: int = 0) -> list[str]:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                     f"--max-restarts={restarts}"]
    return [*launcher, "-m", "maskco.train", *TINY, f"--data={data}", f"--out_dir={out_dir}", *extra]


def _start(command: list[str]) -> subprocess.Popen:
    """A job as a scheduler starts it: its own session and process group, output to a file."""
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(out_dir: str, found, process: subprocess.Popen, timeout: float = 300) -> dict:
    """Poll out_dir/log.jsonl until a record satisfies ``found``; -> that record."""
    deadline = time.monotonic() + timeout
    path = os.path.join(out_dir, "log.jsonl")
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended early:\n{process.stdout.read()[-3000:]}"
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line being written
                        continue
                    if found(record):
                        return record
        time.sleep(0.1)
    raise AssertionError(f"no matching record in {path} after {timeout} s")


@pytest.fixture(scope="module")
def larger_root(tmp_path_factory) -> str:
    """96 images: 12 steps per epoch at 4 images x 2 ranks, so a stop mid-epoch is far from an epoch end."""
    return make_sample_data(str(tmp_path_factory.mktemp("larger") / "data"), num_images=96, num_classes=3,
                            seed=1, size=(120, 90))


# ---- 1. SIGTERM to the process group, with loader workers running
def test_sigterm_to_the_process_group_with_workers_checkpoints_and_resumes(tmp_path, sample_root):
    out_dir = str(tmp_path / "term")
    process = _start(_command(sample_root, out_dir, "--epochs=50", "--workers=2", "--log_every=100"))
    _wait_for(out_dir, lambda r: "start_step" in r, process)
    time.sleep(3)  # a few steps, workers busy decoding
    os.killpg(process.pid, signal.SIGTERM)  # as torchrun, SLURM and `timeout` send it: to the whole group
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    interrupted = [r for r in records(out_dir) if "interrupted" in r][-1]
    assert interrupted["interrupted"] == "SIGTERM"
    state = checkpoint.load(os.path.join(out_dir, checkpoint.LAST))
    assert state["step"] == interrupted["step"] >= 1  # the step reached, not the epoch start
    assert main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--epochs=50",
                 f"--max_steps={state['step'] + 1}"]) == 0
    assert [r for r in records(out_dir) if "resumed_from" in r and "epoch" in r][-1]["step"] == state["step"]


# ---- 2. torchrun: every rank stops within a step of the signal, whatever log_every is
def test_torchrun_ranks_stop_within_a_step_of_sigterm(tmp_path, larger_root):
    out_dir = str(tmp_path / "ddp_term")
    process = _start(_command(larger_root, out_dir, "--epochs=50", "--log_every=1000", ranks=2))
    _wait_for(out_dir, lambda r: "start_step" in r, process)
    time.sleep(4)
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    interrupted = [r for r in records(out_dir) if "interrupted" in r]
    assert interrupted, output[-3000:]
    stopped, asked = interrupted[-1]["step"], interrupted[-1]["asked_at_step"]
    assert asked >= 1 and stopped - asked <= 1, interrupted  # not at the next log step or epoch end
    assert checkpoint.load(os.path.join(out_dir, checkpoint.LAST))["step"] == stopped
    assert "terminate called" not in output


# ---- 3. torchrun --max-restarts: a rank killed with SIGKILL, the group restarts and resumes
def _ranks(parent: int) -> dict[int, int]:
    """{RANK: pid} of the descendants of ``parent`` that are torchrun workers."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = {}, [parent]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            try:
                with open(f"/proc/{child}/environ", "rb") as handle:
                    env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
            except OSError:
                continue
            if b"RANK" in env and b"LOCAL_RANK" in env:
                found[int(env[b"RANK"])] = child
    return found


def test_torchrun_restart_after_a_killed_rank_continues_the_same_curve(tmp_path, sample_root):
    # 24 images / (4 x 2 ranks) = 3 steps per epoch; checkpoints every 2 steps and at epoch ends
    extra = ("--epochs=4", "--ckpt_every=2")
    straight = str(tmp_path / "straight")
    result = subprocess.run(_command(sample_root, straight, *extra, ranks=2), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = str(tmp_path / "restarted")
    process = _start(_command(sample_root, out_dir, *extra, ranks=2, restarts=1))
    saved = _wait_for(out_dir, lambda r: r.get("checkpoint") and r["step"] >= 4, process)
    os.kill(_ranks(process.pid)[1], signal.SIGKILL)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    resumed = [r for r in records(out_dir) if "resumed_from" in r and "epoch" in r]
    assert resumed and resumed[0]["step"] >= saved["step"], output[-3000:]
    expected, got = losses(straight), losses(out_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:  # the last logged value of each step: after the restart, the resumed run's
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


# ---- 4. damaged, stale and shared files
def _two_epochs(tmp_path, data: str, name: str = "run", *extra: str) -> str:
    out_dir = str(tmp_path / name)
    assert main([*TINY, f"--data={data}", f"--out_dir={out_dir}", *extra]) == 0
    return out_dir


def test_kept_checkpoints_and_a_truncated_newest_falls_back(tmp_path, sample_root):
    out_dir = _two_epochs(tmp_path, sample_root, "run", "--max_steps=12")  # checkpoints at steps 6 and 12
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("checkpoint_step"))
    assert names == ["checkpoint_step00000006.pt", "checkpoint_step00000012.pt"]
    assert os.path.samefile(os.path.join(out_dir, checkpoint.LAST), os.path.join(out_dir, names[-1]))
    newest = os.path.join(out_dir, names[-1])
    with open(newest, "r+b") as handle:
        handle.truncate(os.path.getsize(newest) // 2)
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.load(newest)
    assert main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--epochs=3"]) == 0
    log = records(out_dir)
    assert any("damaged" in r.get("warning", "") and names[-1] in r["warning"] for r in log)
    assert [r for r in log if "resumed_from" in r and "epoch" in r][-1]["step"] == 6
    assert max(losses(out_dir)) == 18


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, sample_root, capsys):
    out_dir = _two_epochs(tmp_path, sample_root, "run", "--max_steps=6")
    for name in os.listdir(out_dir):
        if name.startswith("checkpoint_step"):
            with open(os.path.join(out_dir, name), "r+b") as handle:
                handle.truncate(1000)
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint.*--resume=none"):
        main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}"])


def test_stale_temporary_files_are_removed_and_files_follow_the_umask(tmp_path, sample_root):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    stale = out_dir / ".tmp-killed-writer"
    stale.write_bytes(b"\0" * 1000)
    old = os.umask(0o027)
    try:
        _two_epochs(tmp_path, sample_root, "run", "--max_steps=2")
    finally:
        os.umask(old)
    assert not stale.exists()
    assert any(str(stale) in r.get("warning", "") for r in records(str(out_dir)))
    assert not [n for n in os.listdir(out_dir) if n.startswith(".tmp-")]
    # atomic_file.UMASK was read when the module was imported (the test's umask then: 022 or similar)
    mode = os.stat(out_dir / checkpoint.LAST).st_mode & 0o777
    assert mode == 0o666 & ~atomic_file.UMASK


def _tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def test_full_disk_keeps_the_previous_checkpoint_with_one_line(tmp_path, monkeypatch):
    folder = str(tmp_path / "disk")
    mounted = _tmpfs(folder, "3m")
    try:
        store = checkpoint.Store(folder, keep=2)
        state = {"format": checkpoint.FORMAT, "step": 1, "weights": torch.ones(400_000)}  # 1.6 MB
        store.save(state, 1)
        if not mounted:  # not root: the writer fails as a full disk makes it fail
            def full(*args, **kwargs):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(torch, "save", full)
        with pytest.raises(checkpoint.CheckpointError, match=r"no space left .*needs about 1\.\d MiB") as error:
            store.save({**state, "step": 2}, 2)
        assert "\n" not in str(error.value) and folder in str(error.value)
        path, loaded = store.load_latest(warn=pytest.fail)
        assert loaded["step"] == 1 and path.endswith("checkpoint_step00000001.pt")
        assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")]
    finally:
        if mounted:
            subprocess.run(["umount", folder], check=True)


def test_full_disk_in_the_trainer_is_one_line_and_in_the_log(tmp_path, sample_root):
    out_dir = str(tmp_path / "disk")
    if not _tmpfs(out_dir, "200m"):  # one checkpoint (~131 MiB) fits, the second does not
        pytest.skip("needs root to mount a small tmpfs")
    try:
        result = subprocess.run(_command(sample_root, out_dir, "--export=false"), cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        error = result.stderr.strip().splitlines()[-1]
        assert "no space left" in error and out_dir in error
        assert any("no space left" in r.get("error", "") for r in records(out_dir))
        assert checkpoint.load(os.path.join(out_dir, checkpoint.LAST))["step"] == 6
    finally:
        subprocess.run(["umount", out_dir], check=True)


# ---- 5. divergence
def test_a_nan_loss_stops_the_run_without_saving_nan(tmp_path, sample_root, capsys):
    out_dir = str(tmp_path / "nan")
    code = main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--temperature=1.0e-38"])
    assert code == EXIT_DIVERGED
    assert "diverged" in capsys.readouterr().err
    assert any(r.get("diverged") for r in records(out_dir))
    assert not any(r.get("finished") for r in records(out_dir))
    saved = [n for n in os.listdir(out_dir) if n.endswith((".pt", ".pth"))]
    for name in saved:
        state = torch.load(os.path.join(out_dir, name), weights_only=True)
        for tensor in state["encoder_q"].values():
            assert torch.isfinite(tensor.float()).all(), name
    assert "backbone_torchvision.pth" not in saved


def test_non_finite_weights_are_never_checkpointed(tmp_path, sample_root, monkeypatch):
    import maskco.trainer as train_module

    monkeypatch.setattr(train_module, "weights_finite", lambda module: False)
    out_dir = str(tmp_path / "inf")
    assert main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--max_steps=6"]) == EXIT_DIVERGED
    assert not [n for n in os.listdir(out_dir) if n.endswith(".pt")]


# ---- 6. resume that cannot silently lie
def test_resume_on_other_data_is_refused(tmp_path, sample_root):
    out_dir = _two_epochs(tmp_path, sample_root, "run", "--max_steps=2")
    other = shutil.copytree(sample_root, str(tmp_path / "other"))
    first_class = sorted(os.listdir(other))[0]
    os.unlink(os.path.join(other, first_class, sorted(os.listdir(os.path.join(other, first_class)))[0]))
    result = subprocess.run(_command(other, out_dir, "--max_steps=4"), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "other data (24 images" in result.stderr and "this run reads 23 images" in result.stderr


def test_a_global_batch_change_resumes_at_the_same_images(tmp_path, sample_root):
    # batch 4: 6 steps per epoch. Stop at step 8 = 2 steps (8 images) into epoch 1.
    out_dir = _two_epochs(tmp_path, sample_root, "run", "--max_steps=8")
    # batch 2 (12 steps per epoch) continues exactly 8 images into epoch 1: step 12 + 4 = 16
    assert main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--batch_size=2", "--max_steps=17"]) == 0
    log = records(out_dir)
    assert [r for r in log if "resumed_from" in r and "epoch" in r][-1]["step"] == 16
    warning = [r["warning"] for r in log if "global batch changed" in r.get("warning", "")][-1]
    assert "4 -> 2" in warning and "peak lr" in warning
    # batch 3 cannot continue 2 images into an epoch: refused, nothing trained
    out_dir = _two_epochs(tmp_path, sample_root, "odd", "--max_steps=8", "--batch_size=2")
    with pytest.raises(checkpoint.CheckpointError, match="cannot continue there"):
        main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--batch_size=3", "--max_steps=9"])


def test_skipped_images_are_summed_and_carried_across_restarts(tmp_path, sample_copy, write_odd_image):
    folder = os.path.join(sample_copy, sorted(os.listdir(sample_copy))[0])
    for number in range(4):
        write_odd_image("corrupt_jpeg", folder, name=f"bad_{number}.jpg")
    out_dir = _two_epochs(tmp_path, sample_copy, "run", "--max_steps=7")  # 28 images: 7 steps per epoch
    first = [r["skipped_images"] for r in records(out_dir) if "skipped_images" in r][-1]
    assert first >= 4  # every bad image is drawn once per epoch
    assert checkpoint.load(os.path.join(out_dir, checkpoint.LAST))["skipped_images"] == first
    assert main([*TINY, f"--data={sample_copy}", f"--out_dir={out_dir}", "--max_steps=14"]) == 0
    second = [r["skipped_images"] for r in records(out_dir) if "skipped_images" in r][-1]
    assert second >= first + 4


# ---- SLURM script: arguments, paths, port, requeue on the time-limit signal
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
pwd > "$FAKE_LOG/srun.cwd"
trap 'echo term > "$FAKE_LOG/srun.term"; exit 143' TERM
[ -n "${FAKE_SLEEP:-}" ] && { sleep 30 & wait; }
exit 0
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then echo node-a; echo node-b; else echo "$@" >> "$FAKE_LOG/scontrol.calls"; fi
"""


def _slurm(tmp_path, *args, cwd=None, sleep=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path),
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": str(cwd or ROOT),
           "MASKCO_REPO": "" if os.path.exists(os.path.join(ROOT, ".venv/bin/torchrun")) else ROOT}
    if sleep:
        env["FAKE_SLEEP"] = "1"
    return subprocess.Popen(["bash", os.path.join(ROOT, "scripts/slurm_pretrain.sh"), *args], cwd=cwd or ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _srun_args(tmp_path) -> list[str]:
    return (tmp_path / "srun.args").read_text().splitlines()


needs_venv = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv/bin/torchrun")),
                                reason="the SLURM script runs the repository's .venv/bin/torchrun")


@needs_venv
def test_slurm_script_keeps_the_preset_when_the_second_argument_is_an_override(tmp_path):
    process = _slurm(tmp_path, "data/train", "--epochs=100", cwd=str(tmp_path))
    assert process.wait(timeout=60) == 0, process.stderr.read()
    args = _srun_args(tmp_path)
    tail = args[args.index("maskco.train") + 1:]
    assert tail == ["r50_imagenet_200ep", f"--data={tmp_path}/data/train", "--epochs=100"]
    assert f"--rdzv_endpoint=node-a:{20000 + 123456 % 20000}" in args
    assert any(a.startswith("--output=") and "node%n" in a for a in args)
    launcher = args.index("--kill-on-bad-exit=1") + 2
    assert args[launcher:launcher + 3] == [os.path.join(ROOT, ".venv/bin/python"), "-m", "maskco.launch"]
    assert (tmp_path / "srun.cwd").read_text().strip() == ROOT  # runs from the repository, submitted elsewhere


@needs_venv
def test_slurm_script_with_a_preset(tmp_path):
    process = _slurm(tmp_path, "/datasets/x", "coco_800ep", "--batch_size=64")
    assert process.wait(timeout=60) == 0, process.stderr.read()
    args = _srun_args(tmp_path)
    assert args[args.index("maskco.train") + 1:] == ["coco_800ep", "--data=/datasets/x", "--batch_size=64"]


@needs_venv
def test_slurm_time_limit_signal_stops_the_trainer_and_requeues(tmp_path):
    process = _slurm(tmp_path, "/datasets/x", sleep=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.args").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch script
    assert process.wait(timeout=60) == 75, process.stderr.read()
    assert (tmp_path / "srun.term").exists()  # the trainer was asked to checkpoint and stop
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "123456"]


def test_resume_with_another_backend_is_refused(tmp_path, sample_root):
    pytest.importorskip("nvidia.dali", reason="the other backend here is DALI's CPU mode")
    out_dir = _two_epochs(tmp_path, sample_root, "run", "--max_steps=2")
    with pytest.raises(checkpoint.CheckpointError, match="backend torch.*backend dali-cpu"):
        main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--backend=dali-cpu", "--max_steps=4"])
