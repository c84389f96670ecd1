"""Distributed helpers: torchrun init (one plain process without it), the device's precision, gathers,
shuffle-BN for the key branch.

Every function works without a process group (one process), so the trainer has a single code path.
"""
import datetime
import gc
import os
from typing import NamedTuple

import torch
import torch.distributed


# newer torch renamed all_gather_into_tensor (same arguments) and warns on the old name; 2.11 has only the old
_all_gather_single = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 on GPU, fp32 on CPU (CPU autocast is slower than fp32 for convs); else as given."""
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (a Config's) on ``device`` (None: no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[resolve_precision(precision, device)]


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str | None = None, init_method: str | None = None,
                     timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK -> ``(rank, world_size, local_rank, device)``.

    ``device``: "cuda", "cpu" or None (CUDA when available). NCCL on CUDA (one GPU per process, picked by
    LOCAL_RANK), gloo on CPU. Without torchrun's variables this is one process and no process group is made.
    ``init_method`` defaults to torchrun's ``env://`` (MASTER_ADDR / MASTER_PORT); tests pass ``file://``.
    """
    if device not in (None, "cuda", "cpu"):
        raise ValueError(f"device must be 'cuda', 'cpu' or None, got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("environment has only one of RANK / WORLD_SIZE; launch with torchrun (it sets both)")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    store = _attempt_store(rank, world_size, timeout) if init_method is None else None
    if use_cuda:
        device_ = torch.device("cuda", local_rank)
        torch.cuda.set_device(device_)
        # device_id binds NCCL to this GPU now (no guessing in barrier(), no stray context on GPU 0)
        torch.distributed.init_process_group("nccl", init_method=init_method, store=store, timeout=timeout,
                                             rank=rank, world_size=world_size, device_id=device_)
    else:
        device_ = torch.device("cpu")
        torch.distributed.init_process_group("gloo", init_method=init_method, store=store, timeout=timeout,
                                             rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device_)


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta | None):
    """Under torchrun, torchrun's store with keys private to this restart attempt; None otherwise.

    After ``--max-restarts`` relaunches the workers, the store still holds the previous attempt's keys
    (each rank's gloo address among them): a new rank could read a dead peer's address and fail with
    "connection refused". A prefix per attempt (TORCHELASTIC_RESTART_COUNT) keeps attempts apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=rank == 0 and not agent_hosts, timeout=timeout or datetime.timedelta(minutes=30),
        multi_tenant=not agent_hosts)
    return torch.distributed.PrefixStore(f"maskco/attempt_{attempt}/", store)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


_CPU_GROUP = None


def cpu_group():
    """A gloo group over every rank, for small host-side agreements that must not wait on the GPU or
    interleave with the training collectives (the per-step stop flag); None without a process group.
    Created on first use: every rank must call this at the same point."""
    global _CPU_GROUP
    if not is_distributed():
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = torch.distributed.new_group(backend="gloo")
    return _CPU_GROUP


def shutdown(*objects_to_drop) -> None:
    """End the process group cleanly; a no-op without one.

    Leaving the group to interpreter teardown is unordered: gloo can abort at exit ("terminate called
    without an active exception") and NCCL warns that the group was never destroyed. DDP's reducer holds
    the group, so the caller first drops its own references to the DDP model and the optimizer
    (``del model, optimizer``, or hands the last references in here) and ``gc.collect()`` frees them before
    the group goes. The barrier keeps a fast rank from tearing the group down while a slow one is still in
    its last collective.
    """
    del objects_to_drop
    gc.collect()
    global _CPU_GROUP
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _CPU_GROUP = None


def abandon() -> None:
    """Leave the process group after a failure, without the barrier of :func:`shutdown`: the other ranks may
    be dead or waiting in a collective that never completes. A no-op without a group."""
    global _CPU_GROUP
    _CPU_GROUP = None
    if not is_distributed():
        return
    try:  # no barrier, no wait on pending work (experimental in torch: NCCL first, gloo too here)
        torch.distributed.distributed_c10d._abort_process_group()
    except (RuntimeError, ValueError, AttributeError):
        torch.distributed.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable value) on every rank; ``obj`` itself without a group."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src)
    return holder[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s, in place; a no-op without a group.

    For state that lives outside DDP (the momentum key encoder is copied from this) or before DDP wraps
    a module: DDP broadcasts only the module it wraps, once, at construction.
    """
    if get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` from every rank -> ``[world_size * N, ...]`` in rank order; ``x`` itself without a group.

    No gradient flows back (MoCo's ``concat_all_gather``). Every rank must pass the same shape (the loaders
    drop the last partial batch). A channels_last ``[N, C, H, W]`` stays channels_last: it is gathered as its
    contiguous ``[N, H, W, C]`` view instead of being copied to NCHW first.
    """
    if get_world_size() == 1:
        return x
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    rows = x.permute(0, 2, 3, 1) if channels_last else x.contiguous()  # contiguous either way
    out = rows.new_empty((get_world_size() * rows.shape[0],) + tuple(rows.shape[1:]))  # [W*N, ...]
    _all_gather_single(out, rows)
    return out.permute(0, 3, 1, 2) if channels_last else out


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (for logging): a new tensor under a process group, ``x`` itself without one."""
    return all_reduce_sum(x) / get_world_size() if get_world_size() > 1 else x


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks: a new tensor under a process group, ``x`` itself without one."""
    if get_world_size() == 1:
        return x
    total = x.clone()
    torch.distributed.all_reduce(total)  # SUM
    return total


def _take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` along dim 0 that keeps a channels_last ``[N, C, H, W]`` channels_last."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)[idx].permute(0, 3, 1, 2)
    return x[idx]


@torch.no_grad()
def shuffle_batch(x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle-BN, step 1 (MoCo's ``batch_shuffle_ddp``): ``[N, ...]`` -> (``[N, ...]`` from all ranks, idx_unshuffle).

    Every rank gathers all ``world_size * N`` images, draws the same permutation and keeps its slice, so
    the key encoder's BatchNorm never sees a query's own positive alongside the rest of its local batch.
    MoCo draws the permutation on rank 0 and broadcasts it; here ``generator`` must be seeded with the
    SAME seed on every rank (e.g. ``cfg.seed``, not ``seed + rank``) and used only for this, so every rank
    computes the identical permutation and no broadcast (and no extra latency) is needed. Keep the
    generator on the training device so ``randperm`` does not sync. ``world_size == 1``: no gather,
    no shuffle, ``(x, None)``: permuting one batch cannot change its BatchNorm statistics.
    https://github.com/facebookresearch/moco/blob/main/moco/builder.py
    """
    return shuffle_batch_by(x, draw_shuffle(x.shape[0], generator, x.device))


def draw_shuffle(n: int, generator: torch.Generator | None, device, virtual_gpus: int = 1) -> torch.Tensor | None:
    """Shuffle-BN's permutation of the ``world_size * n`` gathered images, ``[W*n]`` on ``device`` (the
    same on every rank when ``generator`` is seeded alike); None when there is one GPU in all (one
    process without virtual GPUs: permuting one batch cannot change its BatchNorm statistics).

    With ``virtual_gpus`` G each rank's ``n`` images are G contiguous groups: the permutation spans the
    W*G groups of every rank, as it would span W*G real GPUs (one process with G = 2 and batch 2n draws
    what 2 ranks of batch n draw)."""
    world_size = get_world_size()
    if world_size * virtual_gpus == 1:
        return None
    drawn_on = generator.device if generator is not None else device
    return torch.randperm(world_size * n, generator=generator, device=drawn_on).to(device)  # [W*n]


@torch.no_grad()
def shuffle_batch_by(x: torch.Tensor, idx_shuffle: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`shuffle_batch` with the permutation drawn beforehand (:func:`draw_shuffle`); None: ``(x, None)``."""
    if idx_shuffle is None:
        return x, None
    x_all = concat_all_gather(x)  # [W*N, ...]
    idx_unshuffle = torch.argsort(idx_shuffle)  # [W*N]
    idx_this = idx_shuffle.view(get_world_size(), -1)[get_rank()]  # [N]
    return _take_rows(x_all, idx_this), idx_unshuffle


@torch.no_grad()
def unshuffle_batch(y: torch.Tensor, idx_unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Shuffle-BN, step 2 (``batch_unshuffle_ddp``): the key feature map of the shuffled batch ``[N, ...]`` ->
    this rank's own samples in their original order ``[N, ...]`` (the key boxes index that order)."""
    if idx_unshuffle is None:
        return y
    y_all = concat_all_gather(y)  # [W*N, ...]
    idx_this = idx_unshuffle.view(get_world_size(), -1)[get_rank()]  # [N]
    return _take_rows(y_all, idx_this)
