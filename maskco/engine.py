"""The training loop: one function over the steps of a run, resumable at any step.

Host syncs happen only on log steps (``loss.item()`` and friends); everything else is queued on the
device. Randomness of the method (boxes, augmentation, mask noise, the shuffle-BN permutation) is a
function of (seed, step, rank), drawn up front by ``run.step`` (maskco.step), so a resumed run draws
exactly what the uninterrupted one drew, eager or compiled.

Stopping: SIGINT/SIGTERM set a flag (:class:`StopRequest`); the ranks agree on it every step
(:class:`StopAgreement`) and stop together one step later, checkpointing that step. A non-finite
loss at a log step raises :class:`Diverged` on every rank (the logged loss is the same on all).
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field

import torch

from maskco import dist
from maskco.model import KeyEncoderEMA
from maskco.step import Prefetcher, plain_steps


@dataclass
class LoopState:
    """Where the run is: ``step`` steps done in total; ``epoch`` is the epoch being run."""

    epoch: int = 0
    step: int = 0
    stop_signal: int = 0  # the signal that asked us to stop (SIGTERM from SLURM, Ctrl-C), 0 if none
    stop_asked_at: int = 0  # the step at which rank 0 (this process) received it
    skipped_images: int = 0  # unreadable images replaced so far: all ranks, all restarts (as of the last log step)
    history: list = field(default_factory=list)  # (step, loss) of every log step, for tests and summaries


class Diverged(RuntimeError):
    """The loss (or the weights) stopped being finite: the run must end without saving them."""


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag checked between steps, so that a checkpoint is written at a
    step boundary instead of the process dying mid-step. (Loader workers ignore both signals, see
    ``pipelines.ignore_stop_signals``: a signal to the process group must reach only this decision.)"""

    def __init__(self):
        self.signal = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal and signum == signal.SIGINT:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopAgreement:
    """Every rank stops at the same step: each step sends this rank's flag in a non-blocking all-reduce
    and reads the previous step's result, so all ranks stop one step after any was asked to.

    The all-reduce runs on a CPU (gloo) group of its own: it never waits on the GPU stream or on the
    training collectives, and one float per step costs microseconds. Call it exactly once per step on
    every rank. One process: the flag itself, at once.
    """

    def __init__(self):
        self.group = dist.cpu_group()
        self.flag = torch.zeros(1)
        self.work = None

    def __call__(self, asked: bool) -> bool:
        if self.group is None:
            return asked
        if self.work is not None:
            self.work.wait()  # sent a step ago: done by now
            self.work = None
            if self.flag.item() > 0:
                return True
        self.flag = torch.tensor([float(asked)])
        self.work = torch.distributed.all_reduce(self.flag, group=self.group, async_op=True)
        return False

    def close(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class LogWindow:
    """Sums of the loss and the method's statistics since the last log step, on the device (no sync);
    :meth:`record` turns them into one log record with a single stacked all-reduce."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.data_wait, self.start = 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, stats: dict, data_wait: float) -> None:
        for name, value in {"loss": loss, **stats}.items():
            value = value.detach().float()
            # a copy: a graph-captured step overwrites its outputs at the next replay
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.steps += 1
        self.data_wait += data_wait

    def record(self, skipped: int, global_batch: int) -> dict:
        """{loss, stats...: means over the window and ranks, skipped_images: sum over ranks, speed}."""
        # note: the host sync of the loop
        names = list(self.sums)
        values = torch.stack([self.sums[n] / self.steps for n in names]
                             + [torch.tensor(float(skipped), device=self.device)])
        totals = dist.all_reduce_sum(values).tolist()
        world = dist.get_world_size()
        elapsed = time.perf_counter() - self.start
        return {**{n: v / world for n, v in zip(names, totals)},
                "img_per_s": self.steps * global_batch / elapsed, "steps_per_s": self.steps / elapsed,
                "data_wait": self.data_wait / elapsed, "skipped_images": int(totals[-1])}


def optimise(value: torch.Tensor, optimizer, scaler, ema: KeyEncoderEMA, momentum: float) -> None:
    """One update from the loss: backward through the scaler (a no-op unless fp16), the optimiser step,
    then the EMA of the key encoder. The trainer and the bench both step through here."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(value).backward()
    scaler.step(optimizer)
    scaler.update()
    ema(momentum)


def train(run, loader, state: LoopState, on_log, on_checkpoint, on_epoch_end) -> LoopState:
    """Run from ``state`` to ``run.schedule.stop_step`` (the end of training, or max_steps) or a stop signal.

    run: the assembled pieces (see maskco.build.Run). Callbacks: on_log(record), on_checkpoint(state),
    on_epoch_end(state). Every checkpoint follows a log step, so a diverged loss is never saved.
    Raises :class:`Diverged` (on every rank) when the logged loss is not finite.
    """
    model, plan = run.model, run.schedule
    steps_per_epoch = len(loader)
    window = LogWindow(model.device)
    agree = StopAgreement()
    skipped_before = state.skipped_images  # counted by earlier processes of this run (from the checkpoint)
    try:
        with StopRequest() as stop:
            while state.epoch < plan.epochs and state.step < plan.stop_step and not state.stop_signal:
                loader.set_epoch(state.epoch, skip_batches=state.step - state.epoch * steps_per_epoch)
                # (batch, its step's randomness, its ready inputs made one step ahead or None)
                steps = Prefetcher(loader, run.step, state.step, plan.stop_step) if run.prefetch \
                    else plain_steps(loader, run.step, state.step)
                tick = time.perf_counter()
                for batch, noise, inputs in steps:
                    data_wait = time.perf_counter() - tick
                    lr, momentum = plan.lr(state.step), plan.ema_momentum(state.step)
                    for group in model.optimizer.param_groups:
                        group["lr"] = lr
                    value, stats, keys = run.step.forward(batch, noise, inputs)
                    optimise(value, model.optimizer, model.scaler, model.ema, momentum)
                    if model.queue is not None:
                        model.queue.enqueue(dist.concat_all_gather(keys.detach()))
                    state.step += 1
                    window.add(value, stats, data_wait)
                    # ---- one decision: stop here (every rank at this step), and what to write
                    if stop.signal and not state.stop_asked_at:
                        state.stop_asked_at = state.step
                    if agree(stop.signal != 0):
                        state.stop_signal = stop.signal or signal.SIGTERM
                    end_of_epoch = state.step % steps_per_epoch == 0
                    checkpoint = end_of_epoch or bool(plan.ckpt_every and state.step % plan.ckpt_every == 0)
                    done = state.step >= plan.stop_step or bool(state.stop_signal)
                    if checkpoint or done or state.step % plan.log_every == 0:
                        on_log(log_record(state, window, loader.skipped, skipped_before, plan.global_batch,
                                          lr=lr, momentum=momentum))
                    if end_of_epoch:
                        state.epoch += 1
                        on_epoch_end(state)
                    elif checkpoint or done:
                        on_checkpoint(state)
                    if done:
                        break
                    tick = time.perf_counter()
    finally:
        agree.close()
    return state


def log_record(state: LoopState, window: LogWindow, skipped: int, skipped_before: int, global_batch: int,
               **values) -> dict:
    """The log step's record (``window``'s means over ranks; the window starts again), kept in
    ``state.history``. Raises :class:`Diverged` when the mean loss is not finite."""
    record = {"epoch": state.epoch, "step": state.step, **values, **window.record(skipped, global_batch)}
    record["skipped_images"] += skipped_before
    state.skipped_images = record["skipped_images"]
    if not math.isfinite(record["loss"]):
        raise Diverged(f"the loss is {record['loss']} at step {state.step} (mean of steps "
                       f"{state.step - window.steps + 1}-{state.step}): training diverged")
    state.history.append((state.step, record["loss"]))
    window.reset()
    return record
