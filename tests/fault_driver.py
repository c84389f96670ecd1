"""A user's or a scheduler's bad day, injected into a real process: ``tests/test_faults.py`` starts
``python -m tests.fault_driver FAULT [args ...]`` in a session of its own and watches it end.

FAULT (the trainer, ``maskco.train.cli`` with ``args``; each fires at step 3 of the run's first attempt):
  step        the optimiser step raises (a CUDA fault, an out-of-memory, a bug in the loop)
  loader      a sample raises something other than a decode error (a bug in a user's augmentation), in
              the backend's own worker: a torch DataLoader process, FFCV's loading thread, DALI's batches
  checkpoint  the second checkpoint write fails midway (an I/O error, not a full disk)
  none        nothing: the trainer as it is
  rank1       rank 1 of a torchrun job raises in its step (first attempt only; torchrun restarts the rest)
A loader left open by a script (``build_loader``, iterate, leave without ``close()``):
  noclose-one BACKEND WORKERS SOURCE    after one batch
  noclose-raise BACKEND WORKERS SOURCE  through an exception raised in the loop
"""
from __future__ import annotations

import errno
import os
import sys

import pipelines

FAIL_AT = 3  # the step that fails: steps 1-2 train and step 2 checkpoints (--ckpt_every=2)


def fail_in_step(only_rank: str | None = None) -> None:
    import maskco.engine as engine

    real, calls = engine.optimise, [0]

    def optimise(*args, **kwargs):
        calls[0] += 1
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if calls[0] == FAIL_AT and first_attempt and only_rank in (None, os.environ.get("RANK")):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return real(*args, **kwargs)

    engine.optimise = optimise


def fail_in_loader() -> None:
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug in the user's augmentation (simulated)")

    from pipelines import torch_loader

    poisoned = set(pipelines.epoch_shard(24, 4, 0, 1, seed=0, epoch=0)[(FAIL_AT - 1) * 4:FAIL_AT * 4].tolist())
    getitem = torch_loader.TwoViewDataset.__getitem__  # in a DataLoader worker process (or this one)
    torch_loader.TwoViewDataset.__getitem__ = lambda self, key: bug() if key[1] in poisoned else getitem(self, key)
    try:  # FFCV and DALI are optional: a machine without them runs the torch cells only
        from pipelines import ffcv_loader
    except ImportError:
        ffcv_loader = None
    if ffcv_loader is not None:
        run_pipeline = ffcv_loader._EpochThread.run_pipeline  # in FFCV's loading thread
        ffcv_loader._EpochThread.run_pipeline = lambda self, b_ix, *args: (
            bug() if b_ix == FAIL_AT - 1 else run_pipeline(self, b_ix, *args))
    try:
        from pipelines import dali_loader
    except ImportError:
        dali_loader = None
    if dali_loader is not None:
        batch = dali_loader.DaliLoader._batch
        dali_loader.DaliLoader._batch = lambda self, out, step, mine: (
            bug() if step == FAIL_AT - 1 else batch(self, out, step, mine))


def fail_in_checkpoint_write() -> None:
    import torch

    real, calls = torch.save, [0]

    def save(obj, stream, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2 and hasattr(stream, "write"):
            stream.write(b"\0" * 4096)  # some of it reached the disk
            raise OSError(errno.EIO, "Input/output error (simulated)")
        return real(obj, stream, *args, **kwargs)

    torch.save = save


def main(argv: list[str]) -> int:
    fault, args = argv[0], argv[1:]
    {"step": fail_in_step, "loader": fail_in_loader, "checkpoint": fail_in_checkpoint_write,
     "rank1": lambda: fail_in_step(only_rank="1"), "none": lambda: None}[fault]()
    from maskco import train

    sys.argv = [sys.argv[0], *args]
    return train.cli()


if __name__ == "__main__" and sys.argv[1].startswith("noclose"):
    # a user's script: module-level code, so the loader is a global that lives until the interpreter exits
    how, backend, workers, source = sys.argv[1:5]
    loader = pipelines.build_loader(backend, source, batch_size=4, image_size=32, device="cpu", workers=int(workers))
    loader.set_epoch(0)
    for batch in loader:
        if how == "noclose-raise":
            raise RuntimeError("a bug in the user's loop (simulated)")
        break
    print("leaving without close()", flush=True)
elif __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
