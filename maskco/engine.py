"""The training loop: one function over the steps of a run, resumable at any step.

Host syncs happen only on log steps (``loss.item()`` and friends); everything else is queued on the
device. Randomness of the method (boxes, augmentation, mask noise, the shuffle-BN permutation) is a
function of (seed, step, rank), so a resumed run draws exactly what the uninterrupted one drew.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

import torch

from maskco import dist, schedule
from maskco.method import forward_loss, ready_inputs
from maskco.model import momentum_update


@dataclass
class LoopState:
    """Where the run is: ``step`` steps done in total; ``epoch`` is the epoch being run."""

    epoch: int = 0
    step: int = 0
    stop_signal: int = 0  # the signal that asked us to stop (SIGTERM from SLURM, Ctrl-C), 0 if none
    history: list = field(default_factory=list)  # (step, loss) of every log step, for tests and summaries


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag checked between steps, so that a checkpoint is written at a
    step boundary instead of the process dying mid-step."""

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
        if self.signal:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (a collective: call it on every rank)."""
    return dist.all_reduce_mean(torch.tensor(float(flag), device=device)).item() > 0


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 4099 + rank


def optimise(value: torch.Tensor, optimizer, scaler, encoder_q, encoder_k, momentum: float) -> None:
    """One update from the loss: backward through the scaler (a no-op unless fp16), the optimiser step,
    then the EMA of the key encoder. The trainer and the bench both step through here."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(value).backward()
    scaler.step(optimizer)
    scaler.update()
    momentum_update(encoder_k, encoder_q, momentum)


def train(run, loader, state: LoopState, on_log, on_checkpoint, on_epoch_end) -> LoopState:
    """Run from ``state`` to ``run.stop_step`` (the end of training, or max_steps) or a stop signal.

    run: the assembled pieces (see train.Run): encoder_q (maybe DDP), encoder_k, optimizer, scaler,
    spec, queue, device, amp dtype, schedule numbers. Callbacks: on_log(record), on_checkpoint(state),
    on_epoch_end(state).
    """
    device = run.device
    generator = torch.Generator(device=device)  # boxes, augmentation, mask noise: per rank
    shuffle_generator = torch.Generator(device=device)  # shuffle-BN: identical on every rank
    steps_per_epoch = len(loader)
    window_loss = torch.zeros((), device=device)
    window_stats: dict = {}
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    with StopRequest() as stop:
        while state.epoch < run.epochs and state.step < run.stop_step:
            loader.set_epoch(state.epoch, skip_batches=state.step - state.epoch * steps_per_epoch)
            tick = time.perf_counter()
            for batch in loader:
                data_wait += time.perf_counter() - tick
                lr = schedule.cosine(state.step, run.total_steps, run.peak_lr, run.min_lr, run.warmup_steps)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                generator.manual_seed(step_seed(run.seed, state.step, run.rank))
                shuffle_generator.manual_seed(step_seed(run.seed, state.step, 0))
                inputs = ready_inputs(batch, run.spec, generator)  # fp32: outside autocast, whatever the precision
                with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                    value, stats, keys = forward_loss(run.encoder_q, run.encoder_k, inputs, run.spec,
                                                      shuffle_generator, run.queue)
                momentum = schedule.ema_momentum(state.step, run.total_steps, run.momentum, run.momentum_schedule)
                optimise(value, run.optimizer, run.scaler, run.encoder_q, run.encoder_k, momentum)
                if run.queue is not None:
                    run.queue.enqueue(dist.concat_all_gather(keys.detach()))
                state.step += 1
                window_steps += 1
                window_loss += value.detach()
                for name, tensor in stats.items():
                    window_stats[name] = window_stats.get(name, 0) + tensor.detach()
                last_of_epoch = state.step % steps_per_epoch == 0
                if state.step % run.log_every == 0 or last_of_epoch or state.step >= run.stop_step:
                    # note: the only host sync of the loop
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "epoch": state.epoch, "step": state.step, "lr": lr, "momentum": momentum,
                        "loss": dist.all_reduce_mean(window_loss / window_steps).item(),
                        **{k: dist.all_reduce_mean(v / window_steps).item() for k, v in window_stats.items()},
                        "img_per_s": window_steps * run.global_batch / elapsed,
                        "steps_per_s": window_steps / elapsed,
                        "data_wait": data_wait / elapsed,
                        "skipped_images": int(getattr(loader, "skipped", 0)),
                    }
                    state.history.append((state.step, record["loss"]))
                    on_log(record)
                    window_loss.zero_()
                    window_stats = {}
                    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                    if _any_rank(stop.signal != 0, device):  # every rank stops at the same step
                        state.stop_signal = stop.signal or signal.SIGTERM
                if last_of_epoch:
                    state.epoch += 1
                    on_epoch_end(state)
                elif run.ckpt_every and state.step % run.ckpt_every == 0:
                    on_checkpoint(state)
                if stop.signal and not dist.is_distributed():  # one process: no need to agree on the step
                    state.stop_signal = stop.signal
                if state.stop_signal or state.step >= run.stop_step:
                    break
                tick = time.perf_counter()
            if state.stop_signal:
                on_checkpoint(state)
                break
            if state.step >= run.stop_step and state.step % steps_per_epoch:
                on_checkpoint(state)  # max_steps ended mid-epoch
    return state
