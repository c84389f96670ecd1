"""What the per-step stop agreement (maskco.engine.StopAgreement) costs: 2 gloo ranks on this machine.

    .venv/bin/python scripts/bench_stop_agreement.py

Prints the time per call back to back (the all-reduce's round trip, the worst case) and a stand-in
step of CPU matrix products with and without the agreement (the baseline, measured in the same run).
"""
import os
import sys
import tempfile
import time

import torch
import torch.distributed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from maskco import dist  # noqa: E402
from maskco.engine import StopAgreement  # noqa: E402


def _worker(rank: int, init_file: str, steps: int) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    agree, x = StopAgreement(), torch.randn(256, 256)
    times = {}
    for mode in ("agreement only", "step", "step + agreement", "step again"):
        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            if mode != "agreement only":
                for _ in range(8):
                    x = torch.tanh(x @ x.T / 256)
            if "agreement" in mode:
                agree(False)
        agree.close()
        torch.distributed.barrier()
        times[mode] = (time.perf_counter() - start) / steps
    if rank == 0:
        for mode, seconds in times.items():
            print(f"{mode:>18}: {seconds * 1e3:8.3f} ms per step")
        baseline = (times["step"] + times["step again"]) / 2
        print(f"step + agreement / step: {times['step + agreement'] / baseline:.3f}")
    dist.shutdown()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.spawn(_worker, args=(os.path.join(folder, "init"), 200), nprocs=2)
