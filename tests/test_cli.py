"""The command line as a person meets it: help, one grammar, terminal vs piped output, resume messages,
one-line errors (exit 2), the FFCV converter's interpreter and the Makefile's machine check.

Entry points run for real in a subprocess (cwd = the repository, PYTHONPATH set), tiny configs only.
"""
from __future__ import annotations

import json
import os
import pty
import shutil
import io
import subprocess
import sys

import pytest
import torch

from maskco import cli
from maskco.config import ConfigError, build_config, valid_keys
from maskco.runlog import signal_name
from maskco.trainlog import lines as train_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
# the trainer's TINY settings (tests/test_train.py), written in the other spellings of the grammar
TINY = ["--arch", "resnet18", "--image-size", "64", "--batch_size=4", "--box-min-size=8", "--mph_width", "64",
        "--mph_heads=2", "--head_hidden=128", "--head_dim=32", "--num_negatives=4", "--epochs=2",
        "--warmup_epochs=0.5", "--workers=0", "--log_every=1", "--export"]


def python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def train(data: str, out_dir: str, *extra: str) -> subprocess.CompletedProcess:
    return python("-m", "maskco.train", *TINY, f"--data={data}", f"--out_dir={out_dir}", *extra)


def on_a_terminal(args: list[str], timeout: int = 300) -> tuple[int, str]:
    """Run ``python args`` with stdout and stderr on a pseudo-terminal; -> (exit code, what it showed)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**ENV, "COLUMNS": "120"},
                               stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=timeout), b"".join(chunks).decode(errors="replace").replace("\r", "")


def one_error_line(result: subprocess.CompletedProcess, prog: str, text: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"{prog}: error: ") and text in lines[0], lines[0]
    return lines[0]


# ---- 1. help, no arguments, one grammar
def test_train_help_lists_every_key_with_type_default_and_description():
    result = python("-m", "maskco.train", "--help")
    assert result.returncode == 0, result.stderr
    for key in valid_keys():
        assert f"--{key}" in result.stdout, key
    assert "--weight_decay FLOAT" in result.stdout and "on >= 2-D weights" in result.stdout
    assert "(default: 0.0001)" in result.stdout and "--export / --no-export" in result.stdout
    assert "optimisation (DESIGN 4.7)" in result.stdout and "cpu_demo" in result.stdout


def test_show_help_has_its_own_options_and_the_config_keys():
    result = python("-m", "maskco.show", "-h")
    assert result.returncode == 0, result.stderr
    assert "--out PATH" in result.stdout and "--images N" in result.stdout and "--mask_mode STR" in result.stdout


def test_train_without_arguments_prints_usage_and_trains_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "maskco.train"], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("usage: python -m maskco.train")
    assert not os.path.exists(tmp_path / "runs")


def test_config_grammar_spellings_are_the_same():
    spelled = cli.parse_config_args(["cpu_demo", "--out-dir", "x", "--batch_size", "8", "--no-export",
                                     "--compile", "--mask-mode=noise", "--roi_fused", "false"])
    assert spelled.presets == ["cpu_demo"]
    cfg = build_config(spelled.config)
    assert (cfg.out_dir, cfg.batch_size, cfg.export, cfg.compile, cfg.mask_mode, cfg.roi_fused) == (
        "x", 8, False, True, "noise", False)
    with pytest.raises(ConfigError, match="did you mean epochs"):
        cli.parse_config_args(["--epoch", "3"])
    with pytest.raises(ConfigError, match="needs a value"):
        cli.parse_config_args(["--epochs"])


def test_argparse_tools_take_underscores_and_no_flags(tmp_path):
    from maskco import quality, tool_args

    args = tool_args.linear_args(["--random_init", "--arch", "resnet18", "--train=a", "--val", "b", "--out_dir", "o",
                                  "--no-nesterov", "--weight_decay=1e-4"])
    assert (args.random_init, args.out_dir, args.nesterov, args.weight_decay) == (True, "o", False, 1e-4)
    args = quality.parse_args(["--out_dir", "q", "--momentum", "0.99", "--weight_decay=1e-4", "--no-compile"])
    assert args.out_dir == "q"
    assert args.overrides == ["--momentum=0.99", "--weight_decay=1e-4", "--compile=false"]


@pytest.mark.parametrize("spelling, value", [("1e-4", 1e-4), ("1E-4", 1e-4), (".5", 0.5), ("1.0e-4", 1e-4),
                                             ("3", 3.0), ("2.5E+1", 25.0)])
def test_every_ordinary_float_spelling_is_accepted(spelling, value):
    assert build_config([f"--weight_decay={spelling}"]).weight_decay == pytest.approx(value)


def test_float_spelling_in_a_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("weight_decay: 1e-5\nbox_area: [1e-2, 0.25]\n")
    cfg = build_config([str(preset)])
    assert (cfg.weight_decay, cfg.box_area) == (1e-5, (0.01, 0.25))
    with pytest.raises(ConfigError, match="weight_decay"):
        build_config(["--weight_decay=small"])


# ---- 2. a terminal shows a person's view; a pipe gets JSON
def test_terminal_run_shows_human_lines_and_no_json(tmp_path, sample_root):
    out_dir = str(tmp_path / "tty")
    code, shown = on_a_terminal(["-m", "maskco.train", *TINY, f"--data={sample_root}", f"--out_dir={out_dir}",
                                 "--max_steps=2"])
    assert code == 0, shown
    assert '{"' not in shown and '"config"' not in shown, shown
    for text in ("run       defaults: MaskCo, resnet18", "device    cpu (fp32)", f"out_dir   {out_dir}",
                 f"data      {sample_root}: 24 images, backend torch", "start     fresh start",
                 "step 2/2  loss ", "img/s ", "data wait ", "finished  2 steps in", "backbone_torchvision.pth"):
        assert text in shown, (text, shown)
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as handle:
        log = [json.loads(line) for line in handle]
    assert "config" in log[0] and log[-1]["finished"]


class _Screen(io.StringIO):
    """stdout and stderr of a terminal, as one buffer in the order things were written."""

    def isatty(self) -> bool:
        return True


def test_the_progress_bar_draws_its_last_state_before_the_summary(tmp_path, sample_root, monkeypatch):
    from maskco.train import main

    screen = _Screen()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    assert main([*TINY, f"--data={sample_root}", f"--out_dir={tmp_path / 'bar'}", "--max_steps=2"]) == 0
    shown = screen.getvalue()
    summary = shown.index("finished  2 steps in")
    assert "2/2 [" in shown[:summary], shown  # the bar at its end, drawn before the summary line
    assert "2/2 [" not in shown[summary:], shown  # and not redrawn after it


def test_piped_run_prints_json_and_a_rerun_of_a_finished_run_does_nothing(tmp_path, sample_root):
    out_dir = str(tmp_path / "piped")
    first = train(sample_root, out_dir, "--max_steps=2")
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in first.stdout.splitlines()]
    assert "config" in records[0] and records[-1]["finished"] and records[-1]["step"] == 2
    export = os.path.join(out_dir, "backbone_torchvision.pth")
    before = (os.stat(export).st_mtime_ns, open(os.path.join(out_dir, "log.jsonl"), "rb").read())
    again = train(sample_root, out_dir, "--max_steps=2")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["already_finished"] == 2
    assert (os.stat(export).st_mtime_ns, open(os.path.join(out_dir, "log.jsonl"), "rb").read()) == before
    text = train_lines({"already_finished": 2, "out_dir": out_dir})
    assert text == f"already finished at step 2 ({out_dir}); nothing to do: use --resume=none or another --out_dir"


def test_signals_are_named():
    assert signal_name(15) == "SIGTERM" and signal_name(2) == "SIGINT"
    line = train_lines({"interrupted": "SIGTERM", "step": 3, "checkpoint": "c.pt", "hint": "run it again"})
    assert line == "interrupted by SIGTERM: stopped at step 3; checkpoint c.pt; run it again"


# ---- 3. resume says what it decided; a changed model gets its own out_dir
def test_a_command_line_that_changes_the_model_gets_its_own_out_dir():
    def out_dir(*args):
        parsed = cli.parse_config_args(args)
        return cli.derive_out_dir(build_config(parsed.config), parsed)[0].out_dir

    assert out_dir("cpu_demo", "--mph=none", "--epochs=1") == "runs/cpu_demo-mph-none"
    assert out_dir("cpu_demo", "--arch", "resnet34", "--head_dim=64") == "runs/cpu_demo-arch-resnet34-head_dim-64"
    assert out_dir("cpu_demo", "--epochs=1", "--intra_negatives") == "runs/cpu_demo"  # same model: resumable
    assert out_dir("cpu_demo", "--mph=none", "--out_dir=mine") == "mine"
    assert out_dir("cpu_demo", "--mph=attn") == "runs/cpu_demo"  # the preset's value: no change


# ---- 4. one-line errors, exit 2
def test_corrupt_only_image_folder_is_one_line_and_leaves_no_log(tmp_path):
    folder = tmp_path / "bad" / "a"
    folder.mkdir(parents=True)
    for i in range(8):
        (folder / f"{i}.jpg").write_bytes(b"not a jpeg")
    out_dir = tmp_path / "out"
    result = train(str(tmp_path / "bad"), str(out_dir), "--workers=1")  # the error comes from a worker
    one_error_line(result, "maskco.train", "no readable image after")
    assert not (out_dir / "log.jsonl").exists()  # a run that fails while starting appends no header


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, sample_root):
    one_error_line(train(sample_root, str(tmp_path / "o"), "--device=cuda"), "maskco.train", "no CUDA GPU")
    one_error_line(python("-m", "maskco.show", "--device", "cuda"), "maskco.show", "no CUDA GPU")


def test_unwritable_out_dir_is_one_line(tmp_path, sample_root):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    one_error_line(train(sample_root, str(blocker / "out")), "maskco.train", "is not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir_is_one_line(tmp_path, sample_root):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        one_error_line(train(sample_root, str(folder)), "maskco.train", "is not writable")
    finally:
        folder.chmod(0o700)


def test_precision_change_on_resume_is_one_line(tmp_path, sample_root):
    out_dir = str(tmp_path / "p")
    assert train(sample_root, out_dir, "--max_steps=1", "--precision=fp32").returncode == 0
    line = one_error_line(train(sample_root, out_dir, "--max_steps=2", "--precision=fp16"), "maskco.train",
                          "precision=fp32")
    assert "--resume=none" in line


def test_export_errors_are_one_line_exit_2(tmp_path):
    result = python("-m", "maskco.export", str(tmp_path / "missing.pt"), "--out_dir", str(tmp_path / "e"))
    one_error_line(result, "maskco.export", "does not exist")


def test_missing_tensorboard_says_how_to_install(tmp_path, sample_root):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    one_error_line(train(sample_root, str(tmp_path / "tb"), "--tensorboard"), "maskco.train",
                   "EXTRAS=dev,tensorboard")


# ---- 5. the FFCV converter
def _imagenet(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "a").mkdir(parents=True)
    return str(tmp_path / "imagenet")


def test_converter_names_a_missing_module_in_one_line(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    fake = bare / "python"  # an interpreter without the packages (torch, ffcv)
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")
    fake.chmod(0o755)
    result = subprocess.run([os.path.join(ROOT, "scripts", "convert_imagenet_to_ffcv.sh"), "--python", str(fake),
                             _imagenet(tmp_path), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"using {fake}" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import" in lines[0] and "make venv EXTRAS=dev,ffcv" in lines[0], result.stderr


def test_converter_defaults_to_the_repository_venv(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "convert_imagenet_to_ffcv.sh"), repo / "scripts")
    (repo / ".venv" / "bin").mkdir(parents=True)
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    venv_python.chmod(0o755)
    result = subprocess.run([str(repo / "scripts" / "convert_imagenet_to_ffcv.sh"), _imagenet(tmp_path),
                             str(tmp_path / "out")], env=ENV, capture_output=True, text=True, timeout=300)
    assert f"using {venv_python}" in result.stdout, result.stdout + result.stderr
    assert "ModuleNotFoundError" not in result.stderr


# ---- 6. defaults that fit the machine
def test_machine_check_refuses_what_the_machine_or_data_cannot_serve():
    from maskco.machine import refusal

    assert "torch sees no CUDA GPU" in refusal(2, 0, "", "r50_imagenet_200ep", False)
    assert "`.venv/bin/torchrun --nproc_per_node=2" in refusal(2, 0, "", "r50_imagenet_200ep", False)  # not on PATH
    assert "only 4 CUDA GPU(s)" in refusal(8, 4, "/imagenet/train", "r50_imagenet_200ep", False)
    assert "needs DATA=" in refusal(8, 8, "", "r50_imagenet_200ep", False)
    assert refusal(8, 8, "/imagenet/train", "r50_imagenet_200ep", False) is None
    assert refusal(8, 8, "", "cpu_demo", True) is None  # the user asked for that preset


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs a machine with fewer than 2 GPUs")
def test_make_pretrain_gpus_2_without_gpus_refuses(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "torchrun"):  # a stand-in environment: the running interpreter
        tool = venv / "bin" / name
        tool.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
        tool.chmod(0o755)
    (venv / ".installed").touch()
    result = subprocess.run(["make", "-s", "pretrain", "GPUS=2", f"VENV={venv}"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "make pretrain: GPUS=2, but torch sees" in result.stderr, result.stderr


def test_dali_without_a_gpu_says_it_decodes_on_the_cpu(tmp_path, sample_root):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install -e .[dali])")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    result = train(sample_root, str(tmp_path / "dali"), "--backend=dali", "--max_steps=1", "--workers=1")
    assert result.returncode == 0, result.stderr
    warnings = [json.loads(line).get("warning", "") for line in result.stdout.splitlines()]
    assert any("DALI decodes on the CPU" in w for w in warnings)
