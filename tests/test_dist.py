"""maskco.dist: one-process fallbacks, and a real 2-process gloo group for gathers and shuffle-BN."""
import datetime
import os
import time

import pytest
import torch
import torch.multiprocessing

from maskco import dist, model

WORLD_SIZE = 2
PER_RANK = 8
TIMEOUT_S = 120  # the whole spawned test; past it the workers are killed and the test fails


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_one_process_without_torchrun(no_torchrun_env):
    assert dist.init_distributed(device="cpu") == (0, 1, 0, torch.device("cpu"))
    assert not dist.is_distributed()
    assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    dist.shutdown()  # no group: nothing to do, must not raise


def test_init_rejects_bad_arguments(no_torchrun_env, monkeypatch):
    with pytest.raises(ValueError, match="device"):
        dist.init_distributed(device="tpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist.init_distributed(device="cpu")


def test_helpers_are_identities_without_a_group():
    x = torch.randn(4, 3, 5, 5)
    assert dist.concat_all_gather(x) is x
    assert dist.all_reduce_mean(x) is x
    shuffled, idx_unshuffle = dist.shuffle_batch(x, torch.Generator().manual_seed(0))
    assert shuffled is x and idx_unshuffle is None
    assert dist.unshuffle_batch(x, None) is x


def _images(rank: int) -> torch.Tensor:
    """This rank's batch; every image of every rank is distinct and identified by its [0, 0, 0, 0] value."""
    everyone = torch.randn(WORLD_SIZE * PER_RANK, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    everyone[:, 0, 0, 0] = torch.arange(WORLD_SIZE * PER_RANK, dtype=torch.float32)
    return everyone.view(WORLD_SIZE, PER_RANK, 3, 32, 32)[rank].clone()


def _worker(local_rank: int, init_file: str) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(local_rank))
    rank, world_size, _, device = dist.init_distributed(device="cpu", init_method=f"file://{init_file}",
                                                        timeout=datetime.timedelta(seconds=60))
    assert (rank, world_size, device) == (local_rank, WORLD_SIZE, torch.device("cpu"))
    assert dist.is_distributed() and dist.get_rank() == rank and dist.get_world_size() == WORLD_SIZE

    # concat_all_gather: rank order, channels_last kept
    gathered = dist.concat_all_gather(torch.full((2, 3), float(rank)))
    assert torch.equal(gathered, torch.tensor([0.0, 0, 1, 1])[:, None].expand(4, 3))
    x_cl = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    gathered_cl = dist.concat_all_gather(x_cl)
    assert gathered_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gathered_cl[2 * rank:2 * rank + 2], x_cl)
    assert float(dist.all_reduce_mean(torch.tensor(float(rank)))) == 0.5

    # shuffle: a slice of one permutation of everyone's images, identical on all ranks
    x = _images(rank)
    shuffled, idx_unshuffle = dist.shuffle_batch(x, torch.Generator().manual_seed(0))
    ids = shuffled[:, 0, 0, 0].long()  # [PER_RANK]
    assert sorted(dist.concat_all_gather(ids).tolist()) == list(range(WORLD_SIZE * PER_RANK))
    assert (ids // PER_RANK != rank).any(), "the shuffled batch must hold other ranks' images"
    assert torch.equal(dist.unshuffle_batch(shuffled, idx_unshuffle), x)

    # key_features: shuffle -> encoder -> unshuffle == the encoder on the local batch (eval BN is per-sample)
    torch.manual_seed(0)  # same weights on both ranks
    encoder = model.Encoder("resnet18", mph="attn", mph_width=64, mph_heads=4, head_hidden=64).eval()
    with torch.no_grad():
        expected = encoder.features(x)  # [PER_RANK, 512, 1, 1]
    got = model.key_features(encoder, x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # the trainer's shape: DDP query encoder, EMA through the wrapper, then the clean shutdown
    encoder_k = model.build_key_encoder(encoder)
    encoder_q = torch.nn.parallel.DistributedDataParallel(encoder)
    encoder_q(x[:2], torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]).expand(2, 1, 4)).sum().backward()
    with torch.no_grad():
        encoder.head[0].weight.add_(1.0)
    model.momentum_update(encoder_k, encoder_q, 0.0)
    assert torch.equal(encoder_k.head[0].weight, encoder.head[0].weight)
    del encoder_q, encoder
    dist.shutdown()
    assert not dist.is_distributed()


def spawn(worker, nprocs: int, tmp_path) -> None:
    """Run ``worker(local_rank, init_file)`` in ``nprocs`` fresh processes; fail (never hang) past TIMEOUT_S."""
    context = torch.multiprocessing.start_processes(worker, args=(str(tmp_path / "init"),), nprocs=nprocs,
                                                    join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join() raises with the worker's traceback if one fails, and on a non-zero exit (e.g. a gloo abort)
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{nprocs}-process test did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def test_two_process_gloo(tmp_path):
    spawn(_worker, WORLD_SIZE, tmp_path)


def _nccl_worker(local_rank: int, init_file: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    _, world_size, _, device = dist.init_distributed(device="cuda", init_method=f"file://{init_file}",
                                                     timeout=datetime.timedelta(seconds=60))
    assert device == torch.device("cuda", 0) and world_size == 1
    assert torch.distributed.get_backend() == "nccl"
    x = torch.randn(2, 4, 3, 3, device=device).to(memory_format=torch.channels_last)
    assert dist.concat_all_gather(x) is x  # one rank: no collective
    dist.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nccl_init_and_shutdown(tmp_path):
    spawn(_nccl_worker, 1, tmp_path)
