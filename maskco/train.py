"""``python -m maskco.train [preset.yaml ...] [--key=value ...]``: MaskCo pretraining.

One code path for one CPU process, one GPU, or torchrun over many GPUs and nodes. Resumes
automatically from ``out_dir/checkpoint_last.pt`` (``--resume=none`` to start over).

This module is the thin entry point: the grammar, ``--help`` and the exit codes, with no torch loaded
until a run starts; the run itself is ``maskco.trainer``.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import traceback
from typing import Optional

from maskco import cli as grammar
from maskco.atomic_file import CheckpointError
from maskco.config import ConfigError, build_config
from maskco.runlog import OutDirError, abandon_unstarted


EXIT_DIVERGED = 3  # the loss or the weights stopped being finite (README: exit codes)
EXIT_CRASH = 1  # an unexpected exception, as Python itself exits on one
EXIT_SIGINT = 130  # a second Ctrl-C: given up at once, without a checkpoint of this step


def given_up(error: BaseException) -> bool:
    """``error`` was raised while a second Ctrl-C was unwinding (e.g. torch.save failing to close the file
    the KeyboardInterrupt cut short): the user gave up, whatever the library said on the way out."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def known_errors() -> tuple:
    """The error types that mean bad input or a bad checkpoint: one line, exit 2, no traceback. A
    DataError joins once the data side is loaded (none can be raised before)."""
    sources = sys.modules.get("pipelines.sources")
    return (ConfigError, OutDirError, CheckpointError, ImportError) + ((sources.DataError,) if sources else ())


SUMMARY = """MaskCo pretraining: presets (later ones win), then config keys (later ones win). Resumes from
out_dir/checkpoint_last.pt when there is one (--resume=none starts over). On a terminal: a progress bar and
short human lines; every record goes to out_dir/log.jsonl as JSON (and to stdout when it is not a terminal,
or with --json). Example: python -m maskco.train cpu_demo --epochs=1"""


USAGE = ("usage: python -m maskco.train [PRESET ...] [--key=value | --key value ...] [--json]\n"
         "  e.g. python -m maskco.train cpu_demo       (the CPU demo; --help lists presets and every key)\n"
         "  with no arguments nothing runs: the bare defaults are a ResNet-50, 200-epoch ImageNet run")


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        parsed = grammar.parse_config_args(args, {"json": False})
        if parsed.help:
            print(grammar.usage_text("python -m maskco.train", SUMMARY,
                                     "  --json        JSON records on stdout also on a terminal", " [--json]"))
            return 0
        cfg, out_dir_note = grammar.derive_out_dir(build_config(parsed.config), parsed)
        grammar.check_device(cfg.device)
    except ConfigError as error:
        return grammar.fail("maskco.train", error)
    from maskco.trainer import Trainer  # torch and the method load here, after the arguments are good

    trainer = Trainer(cfg, parsed, out_dir_note)
    state, resumed_from = trainer.resume()
    if state.step >= trainer.run.schedule.stop_step:  # finished: say so, touch nothing (no log lines, no export)
        trainer.log.discard()
        trainer.log.show({"already_finished": state.step, "out_dir": cfg.out_dir, "checkpoint": resumed_from})
        trainer.finish()
        return 0
    return trainer.train(state, resumed_from)


def cli() -> int:
    """``main`` for the command line -> the exit code. A bad input is one clear line on stderr (2), any
    other exception its traceback, once (1); a second Ctrl-C is 130. The process group is left without
    waiting for the other ranks (they may be dead or stuck in a collective); the loaders' workers end at
    exit (``pipelines.close_all``). faulthandler: a SIGSEGV / SIGBUS (a memory-mapped data file
    truncated in place) leaves a stack trace."""
    faulthandler.enable()
    try:
        try:
            return main()
        except Exception as error:
            if given_up(error):  # a library's own error on the way out of a second Ctrl-C: still the Ctrl-C
                raise KeyboardInterrupt from error
            raise
    except KeyboardInterrupt:
        print("maskco.train: interrupted by a second Ctrl-C; run the same command again to resume from the last "
              "checkpoint", file=sys.stderr)
        code = EXIT_SIGINT
    except Exception as error:
        abandon_unstarted()  # a run that failed while starting leaves no empty out_dir behind
        if isinstance(error, known_errors()):
            # one that stopped the run before training is the same on every rank (config, data, checkpoint): once a node
            same_everywhere = not getattr(error, "during_training", False)
            code = grammar.fail("maskco.train", error,
                                quiet=same_everywhere and os.environ.get("LOCAL_RANK", "0") != "0")
        else:
            traceback.print_exc()
            code = EXIT_CRASH
    if "maskco.dist" in sys.modules:  # a process group can exist only once the run started to load
        sys.modules["maskco.dist"].abandon()
    return code


if __name__ == "__main__":
    sys.exit(cli())
