"""The trainer end to end on CPU: config, resume, DDP, checkpoints, export, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

from maskco import checkpoint
from maskco.build import key_batchnorm
from maskco.config import ConfigError, build_config, load_preset, method_label, replace, valid_keys
from maskco.model import Encoder, build_key_encoder
from maskco.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch=resnet18", "--image_size=64", "--batch_size=4", "--box_min_size=8", "--mph_width=64",
        "--mph_heads=2", "--head_hidden=128", "--head_dim=32", "--num_negatives=4", "--epochs=2",
        "--warmup_epochs=0.5", "--workers=0", "--log_every=1", "--export=true"]


def records(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def losses(out_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out_dir) if "loss" in r}


def run(tmp_path, name: str, data: str, *extra: str) -> str:
    out_dir = str(tmp_path / name)
    assert main([*TINY, f"--data={data}", f"--out_dir={out_dir}", *extra]) == 0
    return out_dir


# ---- config
@pytest.mark.parametrize("preset", ["cpu_demo", "r50_imagenet_200ep", "coco_800ep", "cc_80ep", "mocov2_200ep"])
def test_presets_load(preset):
    cfg = build_config([preset])
    assert cfg.arch.startswith("resnet") and cfg.epochs >= 1


def test_overrides_are_typed_and_later_wins():
    cfg = build_config(["cpu_demo", "--epochs=7", "--box_area=[0.1, 0.2]", "--roi_fused=false", "--epochs=9"])
    assert (cfg.epochs, cfg.box_area, cfg.roi_fused) == (9, (0.1, 0.2), False)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="did you mean epochs") as error:
        build_config(["--epoch=3"])
    assert all(key in str(error.value) for key in valid_keys())


def test_bad_values_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(["--batch_size=many"])
    with pytest.raises(ConfigError, match="mph"):
        build_config(["--mph=lstm"])
    preset = tmp_path / "bad.yaml"
    preset.write_text("arch: resnet18\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=f"learning_rate.*{preset}"):
        load_preset(str(preset))


def test_every_config_key_has_a_value_rule():
    from maskco.config_rules import RULES

    assert sorted(RULES) == sorted(valid_keys())


@pytest.mark.parametrize("override", ["--base_lr=-1", "--base_lr=nan", "--base_lr=.inf", "--min_lr=-0.1",
                                      "--weight_decay=-1e-4", "--sgd_momentum=1.0", "--temperature=nan",
                                      "--warmup_epochs=-1", "--flip_prob=1.5", "--crop_scale=[0, 1]",
                                      "--jitter=[0.4, 0.4, 0.4, 0.9]", "--workers=-2", "--mph_width=66"])
def test_values_that_make_no_sense_are_refused_before_work_starts(override, capsys):
    assert main([*TINY, override]) == 2
    error = capsys.readouterr().err
    assert override[2:].split("=")[0] in error and "\n" not in error.strip()


def test_main_reports_config_errors_without_traceback(capsys):
    assert main(["--no_such_key=1"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err


# ---- training, resume, export
def test_resume_continues_the_same_loss_curve(tmp_path, sample_root):
    straight = losses(run(tmp_path, "straight", sample_root, "--max_steps=5"))
    # an interruption after 3 steps (mid-epoch: 24 images / 4 = 6 steps per epoch), then a resume
    interrupted = run(tmp_path, "interrupted", sample_root, "--max_steps=3")
    assert os.path.exists(os.path.join(interrupted, checkpoint.LAST))
    run(tmp_path, "interrupted", sample_root, "--max_steps=5")
    resumed = losses(interrupted)
    assert sorted(straight) == [1, 2, 3, 4, 5]
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step


def test_run_writes_log_checkpoint_and_exported_backbone(tmp_path, sample_root):
    out_dir = run(tmp_path, "run", sample_root, "--max_steps=2")
    log = records(out_dir)
    assert "config" in log[0] and "git" in log[0]  # the resolved config and revision come first
    state = checkpoint.load(os.path.join(out_dir, checkpoint.LAST))
    assert state["step"] == 2 and state["config"]["arch"] == "resnet18"
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    exported = torch.load(os.path.join(out_dir, "backbone_torchvision.pth"), weights_only=True)
    model.load_state_dict(exported, strict=True)
    # the export is the query backbone of the checkpoint
    prefix = "backbone."
    for key, value in state["encoder_q"].items():
        if key.startswith(prefix):
            assert torch.equal(exported[key[len(prefix):]], value)


def test_mocov2_baseline_trains(tmp_path, sample_root):
    out_dir = run(tmp_path, "mocov2", sample_root, "--max_steps=2", "--method=mocov2", "--queue_size=256")
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(out_dir).values())
    config = records(out_dir)[0]["config"]
    assert (config["mph"], config["queue_size"], config["other_positives"]) == ("none", 256, False)


def test_method_mocov2_is_moco_v2_unless_told_otherwise():
    moco = build_config(["--method=mocov2"])
    assert (moco.mph, moco.queue_size, moco.other_positives, moco.weight_decay_all, moco.warmup_epochs,
            moco.temperature, moco.momentum) == ("none", 65536, False, True, 0.0, 0.2, 0.999)
    assert method_label(moco) == "MoCo v2"
    preset = build_config(["mocov2_200ep"])
    assert preset == replace(moco, out_dir=preset.out_dir, workers=preset.workers, log_every=preset.log_every,
                             ckpt_every=preset.ckpt_every)
    # what a preset or an override sets wins, and the label then says what it is
    small = build_config(["cpu_demo", "--method=mocov2", "--queue_size=4096", "--mph=attn"])
    assert (small.queue_size, small.mph, small.warmup_epochs) == (4096, "attn", 1.0)
    assert method_label(small) == "MoCo v2-like (mph=attn, queue_size=4096, momentum=0.99)"  # cpu_demo: 0.99
    assert method_label(build_config([])) == "MaskCo"
    assert method_label(build_config(["--roi_centering=half_pixel"])) == "MaskCo (roi_centering=half_pixel)"
    with pytest.raises(ConfigError, match="mocov2 needs negatives"):
        build_config(["--method=mocov2", "--queue_size=0"])


def test_key_bn_sync_converts_only_the_key_branch():
    encoder_q = Encoder("resnet18", mph="none", head_hidden=32, head_dim=16)
    encoder_k = key_batchnorm(build_key_encoder(encoder_q), "sync", torch.device("cuda"), distributed=True)
    kinds = lambda m: {type(x) for x in m.modules()}  # noqa: E731
    assert torch.nn.SyncBatchNorm in kinds(encoder_k) and torch.nn.BatchNorm2d not in kinds(encoder_k)
    assert torch.nn.SyncBatchNorm not in kinds(encoder_q)
    with pytest.raises(ConfigError, match="needs CUDA"):
        key_batchnorm(encoder_k, "sync", torch.device("cpu"), distributed=True)
    assert key_batchnorm(encoder_k, "shuffle", torch.device("cpu"), distributed=True) is encoder_k


def test_checkpoint_of_another_architecture_is_refused(tmp_path, sample_root, capsys):
    out_dir = run(tmp_path, "arch", sample_root, "--max_steps=1")
    with pytest.raises(checkpoint.CheckpointError, match="arch: checkpoint 'resnet18' vs run 'resnet34'"):
        main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--arch=resnet34", "--max_steps=2"])


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    checkpoint.save_atomic({"format": checkpoint.FORMAT, "weights": torch.ones(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(str(path))
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(str(tmp_path / "missing.pt"))


def test_failed_save_leaves_the_old_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint_last.pt")
    checkpoint.save_atomic({"format": checkpoint.FORMAT, "step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save_atomic({"format": checkpoint.FORMAT, "step": 2, "bad": Unpicklable()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint_last.pt"]  # no temporary file left behind


def test_missing_data_path_is_a_clear_error(tmp_path):
    from pipelines import DataError

    with pytest.raises(DataError, match="does not exist"):
        main([*TINY, f"--data={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'out'}"])


# ---- processes: SIGTERM, DDP
def _train_command(data: str, out_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "maskco.train", *TINY, f"--data={data}", f"--out_dir={out_dir}", *extra]


def test_sigterm_writes_a_checkpoint_and_the_rerun_finishes(tmp_path, sample_root):
    out_dir = str(tmp_path / "term")
    process = subprocess.Popen(_train_command(sample_root, out_dir, "--epochs=20"), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # wait for the first step, then ask it to stop
        if '"loss"' in line:
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    state = checkpoint.load(os.path.join(out_dir, checkpoint.LAST))
    assert state["step"] >= 1
    assert any(r.get("interrupted") == "SIGTERM" for r in records(out_dir))  # the signal by name
    assert main([*TINY, f"--data={sample_root}", f"--out_dir={out_dir}", "--epochs=20",
                 f"--max_steps={state['step'] + 1}"]) == 0
    assert max(losses(out_dir)) == state["step"] + 1


def _gather_indices(rank: int, world_size: int, init_file: str, data: str, out: str) -> None:
    import datetime

    import pipelines
    from maskco import dist

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size, timeout=datetime.timedelta(seconds=120))
    loader = pipelines.build_loader("torch", data, batch_size=4, image_size=32, device="cpu", rank=rank,
                                    world_size=world_size, seed=3, workers=0)
    loader.set_epoch(1)
    mine = torch.cat([batch.index for batch in loader])  # [steps * 4]
    everyone = dist.concat_all_gather(mine)  # [world_size * steps * 4], rank order
    if rank == 0:
        torch.save({"all": everyone, "steps": len(loader)}, out)
    dist.shutdown()


def test_ddp_ranks_see_disjoint_data(tmp_path, sample_root):
    out = str(tmp_path / "indices.pt")
    torch.multiprocessing.spawn(_gather_indices, args=(2, str(tmp_path / "init"), sample_root, out), nprocs=2)
    result = torch.load(out, weights_only=True)
    per_rank = result["all"].view(2, -1)
    assert set(per_rank[0].tolist()).isdisjoint(per_rank[1].tolist())
    assert result["steps"] == 24 // (2 * 4)
    assert sorted(result["all"].tolist()) == list(range(24))  # 24 images, 2 ranks x 3 steps x 4: all covered


def test_knn_monitor_is_logged_with_the_loss(tmp_path, sample_root):
    out_dir = run(tmp_path, "knn", sample_root, "--max_steps=6", "--knn_every=1", f"--knn_train={sample_root}",
                  f"--knn_val={sample_root}")
    knn = [r for r in records(out_dir) if "knn_top1" in r]
    assert len(knn) == 1 and knn[0]["epoch"] == 1 and 0 <= knn[0]["knn_top1"] <= 100


def test_command_line_bad_input_is_one_line_without_traceback(tmp_path):
    command = [sys.executable, "-m", "maskco.train", *TINY, f"--data={tmp_path / 'missing'}",
               f"--out_dir={tmp_path / 'out'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"data source {tmp_path / 'missing'} does not exist" in result.stderr


def test_trainer_runs_on_ffcv(tmp_path, sample_root):
    pytest.importorskip("ffcv", reason="FFCV is not installed (pip install -e .[ffcv])")
    from pipelines.ffcv_writer import write_beton

    beton = str(tmp_path / "sample.beton")
    write_beton(sample_root, beton, progress=False)
    out_dir = run(tmp_path, "ffcv", beton, "--backend=ffcv", "--max_steps=2", "--workers=1")
    assert sorted(losses(out_dir)) == [1, 2]


def test_trainer_runs_on_dali_cpu(tmp_path, sample_root):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e .[dali])")
    out_dir = run(tmp_path, "dali", sample_root, "--backend=dali-cpu", "--max_steps=2", "--workers=1")
    assert sorted(losses(out_dir)) == [1, 2]
