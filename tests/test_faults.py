"""The fault matrix: every fault ends the process and all its children, with the right exit code, and
leaves the checkpoint directory intact. Each run is a real process in a session of its own (as a
scheduler starts a job), with a fault injected by ``tests/fault_driver.py``.

Bounds are on hangs, not on speed: a process gets minutes to reach its fault, then ``BOUND`` seconds
to be gone with every process of its group."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import pipelines
from maskco import checkpoint
from pipelines.ffcv_writer import write_beton
from tests.test_cluster import _ranks
from tests.test_train import ROOT, TINY, records

BOUND = 60  # seconds from the fault to the last process of the job gone
STARTUP = 600  # seconds for a loaded 2-core machine to reach the fault
AVAILABLE = pipelines.available_backends()


def cell(backend: str, workers: int):
    """(backend, workers), skipped with the reason where the backend is not installed."""
    return pytest.param(backend, workers, id=f"{backend}-{workers}",
                        marks=pytest.mark.skipif(bool(AVAILABLE[backend]), reason=AVAILABLE[backend]))


# torch's workers are processes, the others' threads (for FFCV and DALI 0 workers is their default
# thread count, the same code path as 2); "dali" without a GPU runs as dali-cpu.
CELLS = [cell("torch", 0), cell("torch", 2), cell("ffcv", 2), cell("dali-cpu", 2)]


@pytest.fixture(scope="module")
def sources(sample_root, tmp_path_factory) -> dict:
    """What each backend reads: the sample folder, or it as a .beton for FFCV."""
    found = {"torch": sample_root, "dali-cpu": sample_root}
    if not AVAILABLE["ffcv"]:
        found["ffcv"] = str(tmp_path_factory.mktemp("faults") / "sample.beton")
        write_beton(sample_root, found["ffcv"], jpeg_quality=90, workers=1, progress=False)
    return found


def start(*args: str, stderr=None) -> subprocess.Popen:
    """``python -m tests.fault_driver ARGS`` in a session (and process group) of its own."""
    return subprocess.Popen([sys.executable, "-m", "tests.fault_driver", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, text=True)


def alive_in_group(group: int) -> list[int]:
    """The processes of process group ``group`` that still run (zombies waiting for a reaper are gone)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as handle:
                state, _, pgrp = handle.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == group and state != "Z":
            found.append(int(name))
    return found


def ends(process: subprocess.Popen, fault_seen=lambda: True) -> int:
    """Wait (up to STARTUP) until the fault has happened or the process ended, then at most BOUND s for the
    process and every process of its group to be gone -> its exit code. A hang kills the group and fails."""
    deadline = time.monotonic() + STARTUP
    while process.poll() is None and not fault_seen() and time.monotonic() < deadline:
        time.sleep(0.2)
    deadline = time.monotonic() + BOUND
    try:
        process.wait(timeout=BOUND)
        while alive_in_group(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    except subprocess.TimeoutExpired:
        pass
    left = alive_in_group(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        pytest.fail(f"processes {left} of the job still ran {BOUND} s after the fault: a hang")
    return process.returncode


def error_records(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "log.jsonl")
    return [r for r in records(out_dir) if "error" in r] if os.path.exists(path) else []


def assert_intact(out_dir: str, step: int) -> None:
    """The newest checkpoint is ``step``'s and verifies, nothing half-written or damaged is left."""
    warnings = []
    path, state = checkpoint.Store(out_dir).load_latest(warnings.append)
    assert state is not None and state["step"] == step and not warnings, (path, warnings)
    assert os.path.samefile(path, os.path.join(out_dir, checkpoint.LAST))
    assert not [n for n in os.listdir(out_dir) if n.startswith(checkpoint.TMP_PREFIX) or n.endswith(".damaged")]


def train_args(source: str, out_dir: str, backend: str = "torch", workers: int = 2, *extra: str) -> list[str]:
    return [*TINY, f"--data={source}", f"--out_dir={out_dir}", f"--backend={backend}", f"--workers={workers}",
            "--max_steps=4", "--ckpt_every=2", "--export=false", *extra]


# ---- 1. an exception in the step, in the loader, in the checkpoint write: exit 1, said once, nothing lost
@pytest.mark.parametrize("fault, step, says", [("step", 2, "illegal memory access"),
                                               ("loader", 2, "user's augmentation")])
@pytest.mark.parametrize("backend, workers", CELLS)
def test_an_exception_ends_the_run_and_keeps_the_checkpoint(tmp_path, sources, backend, workers, fault, step,
                                                            says):
    out_dir = str(tmp_path / "run")
    with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as stderr:
        process = start(fault, *train_args(sources[backend], out_dir, backend, workers), stderr=stderr)
        assert ends(process, lambda: bool(error_records(out_dir))) == 1
        stderr.seek(0)
        said = stderr.read()
    (record,) = error_records(out_dir)  # said once, with the step it follows
    assert record["step"] == step and says in record["error"], record
    assert said.count(", in cli\n") == 1 and says in said, said[-3000:]  # one traceback (chained or not)
    assert_intact(out_dir, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failed_checkpoint_write_ends_the_run_and_keeps_the_previous_one(tmp_path, sample_root, workers):
    out_dir = str(tmp_path / "run")
    process = start("checkpoint", *train_args(sample_root, out_dir, "torch", workers))
    assert ends(process, lambda: bool(error_records(out_dir))) == 1
    (record,) = error_records(out_dir)
    assert record["step"] == 4 and "Input/output error" in record["error"]
    assert_intact(out_dir, 2)


# ---- 2. a dead worker, a second Ctrl-C
def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def _workers_of(pid: int) -> list[int]:
    children = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as handle:
                if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(name))
        except (OSError, ValueError):
            continue
    return children


def _saved(out_dir: str, step: int = 1):
    return lambda: any(r.get("checkpoint") and r.get("step", 0) >= step for r in records(out_dir)) \
        if os.path.exists(os.path.join(out_dir, "log.jsonl")) else False


def test_a_loader_worker_killed_ends_the_run(tmp_path, sample_root):
    out_dir = str(tmp_path / "run")
    process = start("none", *train_args(sample_root, out_dir, "torch", 2, "--max_steps=1000", "--epochs=100",
                                        "--ckpt_every=1"))
    ends_at = time.monotonic() + STARTUP
    while not _saved(out_dir, 2)() and time.monotonic() < ends_at:
        time.sleep(0.2)
    workers = _workers_of(process.pid)
    assert workers, "no loader worker processes"
    os.kill(workers[0], signal.SIGKILL)
    assert ends(process) == 1
    (record,) = error_records(out_dir)
    assert "DataLoader worker" in record["error"]
    # torch reports a dead worker from its SIGCHLD handler, raised in the main thread between any two
    # bytecodes: also while step N's checkpoint is being written (after the step was counted). Then the
    # atomic write leaves step N - 1's checkpoint whole: nothing before the step in progress is lost.
    saved = checkpoint.Store(out_dir).load_latest(lambda text: None)[1]["step"]
    assert saved in (record["step"], record["step"] - 1), (saved, record)
    assert_intact(out_dir, saved)


def test_a_second_ctrl_c_gives_up_at_once_and_ends_every_worker(tmp_path, sample_root):
    out_dir = str(tmp_path / "run")
    process = start("none", *train_args(sample_root, out_dir, "torch", 2, "--max_steps=1000", "--epochs=100"))
    ends_at = time.monotonic() + STARTUP
    while not _saved(out_dir, 0)() and time.monotonic() < ends_at:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the foreground process group
    time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    assert ends(process) == 130
    assert not [n for n in os.listdir(out_dir) if n.startswith(checkpoint.TMP_PREFIX)]


def test_a_library_error_on_the_way_out_of_a_second_ctrl_c_is_still_the_ctrl_c(monkeypatch, capfd):
    """A second Ctrl-C inside torch.save makes torch raise its own RuntimeError while closing the file the
    KeyboardInterrupt cut short: the run still ends as a second Ctrl-C (130, one line), not a crash (1)."""
    from maskco import train

    def interrupted_in_a_library():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(train, "main", interrupted_in_a_library)
    assert train.cli() == 130
    assert "interrupted by a second Ctrl-C" in capfd.readouterr().err


# ---- 3. a user's script that iterates a loader and leaves without close()
@pytest.mark.parametrize("backend, workers", CELLS)
def test_a_script_that_forgets_close_exits(sources, backend, workers):
    process = start("noclose-one", backend, str(workers), sources[backend])
    assert ends(process) == 0


def test_a_script_that_raises_in_its_loop_exits_with_the_error(sample_root):
    process = start("noclose-raise", "torch", "2", sample_root)
    assert ends(process) == 1


# ---- 4. two gloo ranks: one crashes, the job ends (or restarts and resumes) instead of waiting dist_timeout
def _torchrun(fault: str, args: list[str], restarts: int, log) -> subprocess.Popen:
    """The job as make pretrain GPUS=2 launches it: maskco.launch (torchrun's own launcher) over 2 ranks."""
    command = [sys.executable, "-m", "maskco.launch", "--standalone", "--nproc_per_node=2",
               f"--max-restarts={restarts}", "-m", "tests.fault_driver", fault, *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_rank_that_raises_restarts_the_job_from_the_last_checkpoint(tmp_path, sample_root):
    out_dir = str(tmp_path / "run")
    with open(tmp_path / "output.txt", "w+", encoding="utf-8") as log:
        process = _torchrun("rank1", train_args(sample_root, out_dir, "torch", 2, "--max_steps=4"), 1, log)
        code = ends(process, lambda: any("resumed_from" in r and "epoch" in r for r in records(out_dir))
                    if os.path.exists(os.path.join(out_dir, "log.jsonl")) else False)
        log.seek(0)
        assert code == 0, log.read()[-3000:]
    log = records(out_dir)
    crash = [r for r in log if "error" in r and r["rank"] == 1]
    assert crash and crash[0]["step"] == 2 and "illegal memory access" in crash[0]["error"]
    assert [r["step"] for r in log if "resumed_from" in r and "epoch" in r] == [2]
    assert any(r.get("finished") and r["step"] == 4 for r in log)


def test_a_rank_killed_mid_step_ends_the_job(tmp_path, sample_root):
    out_dir = str(tmp_path / "run")
    with open(tmp_path / "output.txt", "w+", encoding="utf-8") as log:
        process = _torchrun("none", train_args(sample_root, out_dir, "torch", 2, "--max_steps=1000",
                                               "--epochs=100"), 0, log)
        ends_at = time.monotonic() + STARTUP
        while not _saved(out_dir, 2)() and time.monotonic() < ends_at:
            time.sleep(0.2)
        rank_1 = _ranks(process.pid)[1]
        while _parent(rank_1) != process.pid:
            rank_1 = _parent(rank_1)  # a loader worker of rank 1 inherits RANK too: its rank is the parent
        os.kill(rank_1, signal.SIGKILL)
        code = ends(process)
        log.seek(0)
        said = log.read()
    assert code == 128 + signal.SIGKILL and "rank 1 was killed by SIGKILL" in said, said[-3000:]
    saved = [r["step"] for r in records(out_dir) if r.get("checkpoint")]
    assert_intact(out_dir, saved[-1])


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maskco.launch", "--standalone", "--nproc_per_node=2", "-m",
                           "maskco.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=STARTUP)


def test_a_bad_key_under_the_launcher_is_one_line_and_exit_2():
    result = _launch(*TINY, "--base_lr=-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "maskco.train: error: config key 'base_lr' must be finite and > 0 (a negative lr climbs the loss), got -1.0"]


def test_divergence_under_the_launcher_is_one_line_and_exit_3(tmp_path, sample_root):
    result = _launch(*TINY, f"--data={sample_root}", f"--out_dir={tmp_path / 'run'}", "--device=cpu",
                     "--temperature=1.0e-38", "--max_steps=3")
    assert result.returncode == 3, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "training diverged" in lines[0], result.stderr[-3000:]


# ---- 5. evaluations that fail after a loader with workers ran
def test_knn_and_linear_exit_after_an_error_with_workers(tmp_path, sample_root, write_odd_image):
    val = tmp_path / "val"
    for label in sorted(os.listdir(sample_root)):
        write_odd_image("corrupt_jpeg", str(val / label), name="bad.jpg")
    common = ["--random-init", "--arch", "resnet18", "--train", sample_root, "--val", str(val), "--image-size",
              "32", "--workers", "2"]
    for module, extra in (("maskco.evaluate.knn", ["--batch-size", "4"]),
                          ("maskco.evaluate.linear", ["--batch-size", "8", "--epochs", "1",
                                                      "--out-dir", str(tmp_path / "linear")])):
        process = subprocess.Popen([sys.executable, "-m", module, *common, *extra], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        assert ends(process) == 2, module
