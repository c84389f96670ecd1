"""``python -m maskco.launch [torchrun options] -m maskco.train ...``: torchrun that keeps the exit code.

torchrun exits 1 whenever a worker fails, after ~40 lines of ``ChildFailedError``, so the trainer's exit
codes (README: 2 bad input, 3 diverged, 130 / 143 stopped by a signal) would not survive ``make pretrain
GPUS=N`` or the SLURM script. This runs torchrun's own launcher (``torch.distributed.run.run``: the same
options, the same elastic agent, its restarts and its monitoring of the workers) and exits with the code
of the first rank that failed, a rank killed by a signal as 128 + the signal's number, as a shell reports
it. Where the rank's own output does not already say why (a crash, a signal), one line names it.

A command line of ``maskco.train`` is checked first (presets and keys, ``maskco.config``): a bad key is the
trainer's one line and exit 2 before any worker starts, instead of one line per rank and a restart per
``--max-restarts``.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from maskco import cli as grammar
from maskco.config import ConfigError, build_config

SAID_BY_THE_RANK = (2, 3)  # bad input, diverged: the trainer printed its one line on rank 0


def exit_code(error: ChildFailedError) -> tuple[int, str]:
    """(the job's exit code, a line naming its first failed rank) of a failed torchrun job."""
    rank, failure = error.get_first_failure()
    others = len(error.failures) - 1
    also = f" (then {others} more rank{'s' * (others > 1)})" if others else ""
    if failure.exitcode < 0:  # torchrun reports a signal as its negative number
        return 128 - failure.exitcode, f"rank {rank} was killed by {failure.signal_name()}{also}"
    return failure.exitcode, f"rank {rank} exited with code {failure.exitcode}{also}"


def check_trainer_config(args) -> None:
    """Raise ConfigError for a ``-m maskco.train`` command line whose presets or keys are bad."""
    if not (args.module and args.training_script == "maskco.train"):
        return
    parsed = grammar.parse_config_args(args.training_script_args, {"json": False})
    if not parsed.help and parsed.config:
        build_config(parsed.config)


def quiet_agent() -> None:
    """The agent's per-worker warnings and errors (the OMP banner, "Sending process ... closing signal",
    "failed (exitcode: 2)") repeat what the ranks and the one line here say; keep its critical ones."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_trainer_config(args)
    except ConfigError as error:
        return grammar.fail("maskco.train", error)
    quiet_agent()
    try:
        run(args)
    except ChildFailedError as error:
        code, line = exit_code(error)
        if code not in SAID_BY_THE_RANK:
            print(f"maskco.launch: {line}; exit {code}", file=sys.stderr)
        return code
    except SignalException as error:  # torchrun itself was signalled: the agent stopped the workers
        return 128 + int(error.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
