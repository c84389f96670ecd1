"""Run logs: JSON lines on rank 0 (stdout and ``out_dir/log.jsonl``), a progress bar on a terminal,
optional TensorBoard. Other ranks log nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


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


class RunLog:
    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.file = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, "log.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # tensorboard is an optional dependency
                raise ImportError(f"tensorboard=true needs the tensorboard package: {error}") from error
            self.writer = SummaryWriter(os.path.join(out_dir, "tb"))
        self.total_steps = 0

    def start_progress(self, total_steps: int, done: int) -> None:
        """A progress bar (img/s, ETA, loss) on a terminal; nothing when stderr is a file or pipe."""
        self.total_steps = total_steps
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done, unit="step", dynamic_ncols=True, file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        line = json.dumps(record, default=str)
        self.file.write(line + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
            if "img_per_s" in record:
                self._progress(record)
        else:
            print(line, flush=True)
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time", "epoch"):
                    self.writer.add_scalar(key, value, record["step"])

    def _progress(self, record: dict) -> None:
        steps_left = max(0, self.total_steps - record["step"])
        eta = steps_left / max(record.get("steps_per_s", 1e-9), 1e-9)
        self.bar.n = record["step"]
        self.bar.set_postfix({"img/s": f"{record['img_per_s']:.0f}", "eta": f"{eta / 60:.1f}min",
                              "loss": f"{record.get('loss', float('nan')):.3f}"}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
