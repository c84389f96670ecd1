"""What must agree across ranks does agree: 2 gloo processes, the trainer's own assembly and loop.

Shuffle-BN computes one query's positive and its negatives with the key encoders of several ranks, so
``encoder_k`` (not only the DDP-broadcast ``encoder_q``) and the queue must be bit-identical everywhere.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest
import torch

import pipelines
from maskco import checkpoint, dist, engine
from maskco.build import build_run
from maskco.config import build_config
from maskco.model import unwrap
from test_train import ROOT, TINY, losses, records

WORLD_SIZE = 2
SMALL = [*TINY, "--queue_size=64", "--device=cpu"]  # the trainer tests' tiny model, with a queue


def _snapshot(run) -> dict:
    model = run.model
    state = {f"q.{name}": t.detach().clone() for name, t in unwrap(model.encoder_q).state_dict().items()}
    state.update({f"k.{name}": t.detach().clone() for name, t in model.encoder_k.state_dict().items()})
    state["queue"] = model.queue.buffer.clone()
    return state


def _worker(local_rank: int, init_file: str, data: str, out_dir: str) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(local_rank))
    info = dist.init_distributed(device="cpu", init_method=f"file://{init_file}",
                                 timeout=datetime.timedelta(seconds=90))
    torch.manual_seed(1000 + info.rank)  # the ranks' host RNGs differ, as in the trainer (seed + rank)
    cfg = build_config([*SMALL, f"--data={data}", "--max_steps=3"])
    loader = pipelines.build_loader("torch", data, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                    device=info.device, rank=info.rank, world_size=WORLD_SIZE, seed=cfg.seed,
                                    workers=0)
    run = build_run(cfg, info, len(loader))
    torch.save(_snapshot(run), os.path.join(out_dir, f"built_{info.rank}.pt"))
    nothing = lambda _: None  # noqa: E731
    engine.train(run, loader, engine.LoopState(), nothing, nothing, nothing)
    torch.save(_snapshot(run), os.path.join(out_dir, f"trained_{info.rank}.pt"))
    run.model.release()
    del run
    dist.shutdown()


def _differing(a: dict, b: dict, skip=()) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not name.endswith(skip) and not torch.equal(a[name], b[name])]


def test_encoders_and_queue_are_identical_on_every_rank(tmp_path, sample_root):
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), sample_root, str(tmp_path)),
                                nprocs=WORLD_SIZE)
    built = [torch.load(tmp_path / f"built_{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert _differing(*built) == [], "after assembly"
    trained = [torch.load(tmp_path / f"trained_{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    # BatchNorm running statistics are the one per-rank state: each rank updates them from its own
    # batch, and DDP re-broadcasts rank 0's at the start of every forward (they never enter a key).
    assert _differing(*trained, skip=("running_mean", "running_var")) == [], "after 3 steps"
    assert not torch.equal(built[0]["k.head.0.weight"], trained[0]["k.head.0.weight"])  # it did train


def _torchrun(data: str, out_dir: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
               "-m", "maskco.train", *TINY, f"--data={data}", f"--out_dir={out_dir}", *extra]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    return result


def test_ddp_resume_gives_the_uninterrupted_losses(tmp_path, sample_root):
    # 24 images / (4 per rank x 2 ranks) = 3 steps per epoch: the interruption is mid-epoch 0 and the
    # straight run crosses into epoch 1, so both the loader position and the encoders must be restored
    straight = str(tmp_path / "straight")
    _torchrun(sample_root, straight, "--max_steps=4")
    log = records(straight)
    assert log[0]["world_size"] == 2 and log[0]["global_batch"] == 8
    assert checkpoint.load(os.path.join(straight, checkpoint.LAST))["world_size"] == 2
    interrupted = str(tmp_path / "interrupted")
    _torchrun(sample_root, interrupted, "--max_steps=2")
    assert checkpoint.load(os.path.join(interrupted, checkpoint.LAST))["step"] == 2
    _torchrun(sample_root, interrupted, "--max_steps=4")
    expected, resumed = losses(straight), losses(interrupted)
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_ddp_compiled_step_gives_the_eager_losses(tmp_path, sample_root):
    """Two gloo ranks with the step compiled (aot_eager: AOTAutograd's graphs, no code generation):
    dynamo around DDP (its forward runs eagerly, the wrapped encoder compiles with DDP's optimizer) and
    shuffle-BN's gathers inside the compiled key branch give the eager run's losses."""
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    _torchrun(sample_root, eager, "--max_steps=4")
    _torchrun(sample_root, compiled, "--max_steps=4", "--compile=true", "--compile_backend=aot_eager")
    expected, got = losses(eager), losses(compiled)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
