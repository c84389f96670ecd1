"""Whether the graph-captured mode really replayed CUDA graphs.

Inductor falls back to running the compiled code without CUDA graphs when something in a graph cannot be
captured (a CPU tensor, a mutated input, a dynamic shape, ...), and says so only under
``TORCH_LOGS=cudagraphs``: "graph-captured" would then equal "compiled" and nobody would notice. So the
bench counts, around each graph-captured figure, Inductor's skip counter and the graphs its CUDA graph
trees recorded, and a figure with a skip or without a recorded graph fails the run (``check``).
"""
from __future__ import annotations

import torch


def skips() -> int:
    """How many times Inductor has skipped CUDA graphs in this process (``counters["inductor"]``)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def recorded_graphs(device: torch.device) -> int:
    """CUDA graphs recorded so far by Inductor's graph trees on ``device`` (0 where none, or on a CPU)."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return 0
    from torch._inductor import cudagraph_trees

    index = device.index if device.index is not None else torch.cuda.current_device()
    manager = cudagraph_trees.get_manager(index, create_if_none_exists=False)
    if manager is None or manager.roots is None:
        return 0
    stack, count = [node for nodes in manager.roots.values() for node in nodes], 0
    while stack:  # a tree of recordings: each node's children are the graphs recorded after it
        node = stack.pop()
        count += 1
        stack.extend(child for nodes in node.children.values() for child in nodes)
    return count


class Counter:
    """The skips and recorded graphs between its creation and ``fields()``."""

    def __init__(self, device: torch.device):
        self.device, self.skips, self.graphs = device, skips(), recorded_graphs(device)

    def fields(self) -> dict:
        return {"cudagraph_skips": skips() - self.skips, "cuda_graphs": recorded_graphs(self.device) - self.graphs}


def check(rows: list[dict]) -> list[str]:
    """One line per graph-captured row that skipped CUDA graphs or recorded none (empty: all captured)."""
    problems = []
    for row in rows:
        if row.get("mode") == "graphs" and "cudagraph_skips" in row:
            if row["cudagraph_skips"] or not row["cuda_graphs"]:
                problems.append(f"{row['figure']} {row['name']}: not captured ({row['cudagraph_skips']} CUDA graph "
                                f"skips, {row['cuda_graphs']} graphs recorded); rerun with TORCH_LOGS=cudagraphs")
    return problems
