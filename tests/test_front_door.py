"""What a newcomer meets first: `make` alone, and the one-line answers to the first mistakes."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*command, timeout=240):
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


def one_error_line(result, prog: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


def test_make_alone_lists_the_targets_and_installs_nothing(tmp_path):
    result = run("make", f"VENV={tmp_path / 'venv'}")
    assert result.returncode == 0, result.stderr
    assert "make pretrain" in result.stdout and "make test" in result.stdout and "make quality" in result.stdout
    assert not (tmp_path / "venv").exists()


def test_a_run_that_fails_while_starting_leaves_no_folder_and_no_json_line(tmp_path):
    out_dir = tmp_path / "new" / "run"
    result = run(sys.executable, "-m", "maskco.train", "cpu_demo", f"--data={tmp_path / 'none'}",
                 f"--out_dir={out_dir}")  # stdout is a pipe: JSON records, once the run starts
    assert result.returncode == 2
    assert "does not exist" in one_error_line(result, "maskco.train")
    assert result.stdout == ""
    assert not (tmp_path / "new").exists()


def test_bad_values_say_what_was_expected_in_words(tmp_path):
    result = run(sys.executable, "-m", "maskco.train", "cpu_demo", "--batch_size=abc")
    assert result.returncode == 2
    assert "expected an integer, got 'abc'" in one_error_line(result, "maskco.train")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = run(sys.executable, "-m", "maskco.train", "cpu_demo", f"--out_dir={a_file}")
    assert result.returncode == 2 and "is a file, not a folder" in one_error_line(result, "maskco.train")
    result = run(sys.executable, "-m", "maskco.export", str(a_file), "--arch=resnet999", f"--out-dir={tmp_path}")
    assert result.returncode == 2 and "invalid choice: 'resnet999'" in result.stderr.strip().splitlines()[-1]
    result = run(sys.executable, "-m", "maskco.show", "cpu_demo", f"--out={a_file / 'views.png'}", "--images=2")
    assert result.returncode == 2 and "cannot write --out=" in one_error_line(result, "maskco.show")


def test_an_output_folder_that_cannot_be_written_is_an_io_error_in_one_line(tmp_path):
    """A folder that cannot be written is an OSError of its own (not a config error), and every tool that
    logs into one says it in one line, exit 2 (the trainer above; the linear evaluation here)."""
    from maskco.config import ConfigError
    from maskco.runlog import OutDirError, check_writable

    a_file = tmp_path / "file"
    a_file.write_text("x")
    try:
        check_writable(str(a_file))
    except OutDirError as error:
        assert isinstance(error, OSError) and not isinstance(error, ConfigError)
    else:
        raise AssertionError("check_writable accepted a file")
    result = run(sys.executable, "-m", "maskco.evaluate.linear", "--random-init", "--arch=resnet18",
                 f"--train={tmp_path}", f"--val={tmp_path}", f"--out-dir={a_file}", "--device=cpu")
    assert result.returncode == 2 and "is a file, not a folder" in one_error_line(result, "maskco.evaluate.linear")


def test_the_configuration_and_the_command_line_load_no_torch():
    # the run's vocabulary is the ground floor (maskco.vocab): reading a config needs none of the method
    # and the trainer's entry point answers --help before it loads the method (maskco.trainer)
    code = ("import sys, maskco.config, maskco.cli, maskco.train; maskco.train.main(['--help']); "
            "print(sorted(m for m in ('torch', 'numpy', 'pipelines') if m in sys.modules))")
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_the_tools_answer_help_without_torch():
    # every entry point parses first and loads torch, the data and the method only to run (maskco.train's rule);
    # the libraries that are tools too read their flags in maskco.tool_args first. maskco.launch is torchrun
    # itself: its --help is torchrun's parser.
    tools = ("maskco.quality", "maskco.show", "maskco.bench", "maskco.export", "maskco.evaluate.knn",
             "maskco.evaluate.linear", "maskco.evaluate.region", "maskco.evaluate.localise", "pipelines.fmnist",
             "pipelines.mosaics", "pipelines.sample_data", "pipelines.ffcv_writer", "maskco.evaluate.detect",
             "maskco.transfer", "pipelines.scenes")
    code = ("import runpy, sys\n"
            f"for name in {tools!r}:\n"
            "    sys.argv = [name, '--help']\n"
            "    try:\n"
            "        runpy.run_module(name, run_name='__main__')\n"
            "    except SystemExit as stop:\n"
            "        assert stop.code in (0, None), (name, stop.code)\n"
            "    assert 'torch' not in sys.modules, name\n"
            "print('no torch')")
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0 and result.stdout.strip().endswith("no torch"), result.stdout + result.stderr


def test_a_tool_that_is_also_a_library_refuses_a_bad_flag_in_one_line_before_torch_loads():
    # the flags are read before the library (and torch) loads: a mistake costs no import, and is still an
    # error line and exit 2, whether argparse or the tool's own check (localise's ConfigError) finds it
    for module, argv, prog in (("maskco.evaluate.knn", ["--random-init", "--train=a", "--val=b"],
                                "python -m maskco.evaluate.knn"),
                               ("maskco.evaluate.localise", ["--random-init", "--images=0"],
                                "maskco.evaluate.localise")):
        code = ("import runpy, sys\n"
                f"sys.argv = [{module!r}, *{argv!r}]\n"
                "try:\n"
                f"    runpy.run_module({module!r}, run_name='__main__')\n"
                "except SystemExit as stop:\n"
                "    print('exit', stop.code, 'torch' in sys.modules)\n")
        result = run(sys.executable, "-c", code)
        assert result.stdout.strip() == "exit 2 False", result.stdout + result.stderr
        line = result.stderr.strip().splitlines()[-1]  # after argparse's usage lines, where argparse finds it
        assert line.startswith(f"{prog}: error: ") and ("--arch" in line or "--images must be >= 1" in line), line


def test_the_static_lists_of_the_command_lines_are_the_libraries():
    # maskco.vocab and maskco.tool_args hold the choices the parsers offer without torch; the libraries
    # build from torchvision's list and export's own table
    import torchvision

    from maskco import export, tool_args, vocab

    assert vocab.ARCHS == tuple(name for name in torchvision.models.resnet.__all__ if name[0].islower())
    assert tool_args.DETECTRON2_LAYOUT_NAMES == tuple(sorted(export.DETECTRON2_LAYOUTS))
