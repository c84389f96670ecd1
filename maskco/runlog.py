"""Run logs on rank 0: every record as a JSON line in ``out_dir/log.jsonl``; on a terminal, short human
lines (and a progress bar on stderr); JSON lines on stdout when it is not a terminal (a pipe, a file,
a test) or with ``--json``. Optional TensorBoard. Other ranks log nothing.

With ``hold=True`` (the trainer), records written before training starts (the config header, the
resume decision) are held back and reach ``log.jsonl`` only with the first record written once training
has started: a run that fails while starting (bad data, an incompatible checkpoint) leaves the log as
it was.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref



class OutDirError(OSError):
    """The output folder cannot be created or written (bad input: one line, exit 2, as a config error)."""


def git_revision() -> str:
    """The source tree's git revision (+ "-dirty"), or "unknown" outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"


def signal_name(number: int) -> str:
    """15 -> "SIGTERM" (the number itself where the platform has no name for it)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


_UNSTARTED: "weakref.WeakSet[RunLog]" = weakref.WeakSet()  # logs whose run may still fail while starting


def abandon_unstarted() -> None:
    """After a failed start (``train.cli``): every live log that never started removes what it created."""
    for log in list(_UNSTARTED):
        log.abandon()


def _missing_folders(path: str) -> list[str]:
    """The folders ``os.makedirs(path)`` would create, deepest first."""
    missing, path = [], os.path.abspath(path)
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def check_writable(out_dir: str) -> None:
    """Create ``out_dir`` and write a file in it, so that a read-only or impossible folder is one clear
    line before anything is built, not a traceback at the first checkpoint."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        what = "is a file, not a folder" if os.path.isfile(out_dir) else f"is not writable ({error.strerror or error})"
        raise OutDirError(f"out_dir {out_dir} {what}; choose another --out_dir") from None


class RunLog:
    """``lines``: record -> text for a terminal (e.g. ``maskco.trainlog.lines``); without it stdout gets JSON.
    ``json_stdout``: JSON on stdout even so (None: when stdout is not a terminal). ``hold``: see above."""

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = False, lines=None,
                 json_stdout: bool | None = None, hold: bool = False):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "log.jsonl")
        self.file = None
        self.writer = None
        self.bar = None
        self.pending: list[str] = []  # JSON lines held back until training has started
        self.started = not hold
        self.lines = lines
        self.total_steps = 0
        if not enabled:
            return
        self.json_stdout = lines is None or (not sys.stdout.isatty() if json_stdout is None else json_stdout)
        self.held: list[dict] = []  # JSON stdout records held back with ``pending`` (a failed start prints none)
        self.created = _missing_folders(out_dir)  # removed again if the run fails before it starts
        check_writable(out_dir)
        _UNSTARTED.add(self)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # tensorboard is an optional dependency
                raise ImportError(f"tensorboard=true needs the tensorboard package ({error}); install it with "
                                  "`make venv EXTRAS=dev,tensorboard` (or `pip install -e .[tensorboard]`)") from None
            self.writer = SummaryWriter(os.path.join(out_dir, "tb"))

    def start_progress(self, total_steps: int, done: int) -> None:
        """Training starts: from the next record on, the log file is written. A progress bar (img/s,
        ETA, loss) on a terminal; nothing when stderr is a file or pipe."""
        self.total_steps = total_steps
        self.started = True
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done, unit="step", dynamic_ncols=True, file=sys.stderr)

    def stop_progress(self) -> None:
        """Training has ended: the bar draws its last state now, so that the lines that say how the run
        ended come after it, not before its final redraw."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.pending.append(json.dumps(record, default=str))
        if self.started:
            self._flush()
        if self.json_stdout and not self.started:
            self.held.append(record)  # shown with the first record of the started run
        else:
            for held in self.held:
                self.show(held)
            self.held = []
            self.show(record)
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time", "epoch"):
                    self.writer.add_scalar(key, value, record["step"])

    def show(self, record: dict) -> None:
        """The terminal's view of a record only (log.jsonl is not touched)."""
        if not self.enabled:
            return
        text = json.dumps(record, default=str) if self.json_stdout else self.lines(record, self.total_steps)
        if text is not None:
            if self.bar is not None:
                self.bar.write(text, file=sys.stdout)
            else:
                print(text, flush=True)
        if self.bar is not None and "img_per_s" in record:
            self._progress(record)

    def record_failure(self, record: dict) -> None:
        """How a run ended on an exception, from any rank: rank 0 writes it as every record, another rank
        appends its one line to the same log.jsonl (so a crash on rank 3 is in the log, not only on its
        stderr). Nothing is written for a run that failed while starting (see ``hold``)."""
        if not self.started:
            return
        if self.enabled:
            self.write(record)
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"time": round(time.time(), 3), **record}, default=str) + "\n")
        except OSError:
            pass  # the traceback on this rank's stderr still says it

    def _flush(self) -> None:
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        for line in self.pending:
            self.file.write(line + "\n")
        self.file.flush()
        self.pending = []

    def discard(self) -> None:
        """Forget the held-back records (a run that decided not to train)."""
        self.pending, self.held = [], []

    def abandon(self) -> None:
        """The run failed before it started: forget what was held and remove the folders this log
        created if they are still empty, so that a failed start leaves nothing behind."""
        if self.started or not self.enabled:
            return
        self.discard()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for folder in self.created:  # deepest first
            try:
                os.rmdir(folder)  # only if empty
            except OSError:
                break
        self.created = []

    def _progress(self, record: dict) -> None:
        steps_left = max(0, self.total_steps - record["step"])
        eta = steps_left / max(record.get("steps_per_s", 1e-9), 1e-9)
        self.bar.n = record["step"]
        self.bar.set_postfix({"img/s": f"{record['img_per_s']:.0f}", "eta": f"{eta / 60:.1f}min",
                              "loss": f"{record.get('loss', float('nan')):.3f}"}, refresh=True)

    def close(self) -> None:
        if self.started and self.pending:
            self._flush()
        self.stop_progress()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
