"""Virtual GPUs (``virtual_gpus=G``): one process's batch behaves as G GPUs of N / G images.

Grouped BatchNorm against BatchNorm per chunk, grouped negatives against per-group logits, and the whole
step: one process with G = 2 and batch 2n against 2 gloo ranks of batch n, the same randomness.
"""
from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch

from maskco import dist, loss
from maskco.build import build_encoders
from maskco.config import ConfigError, build_config
from maskco.method import MethodSpec, draw_noise, inputs_from_noise, loss_from_inputs
from maskco.model import GroupBatchNorm2d, set_virtual_gpus, unwrap
from pipelines import Batch

SMALL = ["--arch=resnet18", "--stem=cifar", "--width=0.25", "--image_size=32", "--box_min_size=8",
         "--mph_width=32", "--mph_heads=2", "--head_hidden=64", "--head_dim=16", "--num_negatives=3",
         "--device=cpu", "--momentum=0.9"]


def _grouped_and_chunked(groups: int, channels_last: bool):
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(6)
    reference.weight.data.uniform_(0.5, 1.5)
    reference.bias.data.uniform_(-0.5, 0.5)
    grouped = set_virtual_gpus(torch.nn.Sequential(copy.deepcopy(reference)), groups)[0]
    x = torch.randn(4 * groups, 6, 5, 3) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return reference, grouped, x


@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_batchnorm_equals_batchnorm_per_chunk(channels_last):
    groups = 4
    reference, grouped, x = _grouped_and_chunked(groups, channels_last)
    assert isinstance(grouped, GroupBatchNorm2d) and grouped.groups == groups
    chunks = [copy.deepcopy(reference) for _ in range(groups)]
    x_grouped, x_chunked = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = grouped(x_grouped)
    y_ref = torch.cat([bn(part) for bn, part in zip(chunks, x_chunked.chunk(groups))])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last  # no silent format change
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    torch.testing.assert_close(x_grouped.grad, x_chunked.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped.weight.grad, sum(bn.weight.grad for bn in chunks), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped.bias.grad, sum(bn.bias.grad for bn in chunks), rtol=1e-4, atol=1e-5)
    # running statistics: the mean of what each chunk's (each GPU's) BatchNorm recorded, still [C]
    for name in ("running_mean", "running_var"):
        expected = torch.stack([getattr(bn, name) for bn in chunks]).mean(0)
        torch.testing.assert_close(getattr(grouped, name), expected, rtol=1e-5, atol=1e-6)
    assert grouped.running_mean.shape == (6,) and int(grouped.num_batches_tracked) == 1


def test_grouped_batchnorm_keeps_the_state_dict_and_evaluates_as_batchnorm():
    reference, grouped, x = _grouped_and_chunked(2, False)
    assert grouped.state_dict().keys() == reference.state_dict().keys()
    grouped.eval(), reference.eval()
    torch.testing.assert_close(grouped(x), reference(x))


def test_set_virtual_gpus_converts_every_batchnorm_and_back():
    torch.manual_seed(0)
    from maskco.model import Encoder

    encoder = Encoder("resnet18", mph="conv", stem="cifar", width=0.25, head_hidden=32, head_dim=8)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    set_virtual_gpus(encoder, 4)
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, GroupBatchNorm2d) and m.groups == 4 for m in norms)  # conv MPH too
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    set_virtual_gpus(encoder, 1)
    assert all(m.groups == 1 for m in norms)


@pytest.mark.parametrize("intra, other_positives", [(False, False), (True, False), (False, True)])
def test_grouped_negatives_equal_per_group_logits(intra, other_positives):
    torch.manual_seed(0)
    groups, n, m, c = 3, 4, 2, 8
    q = torch.nn.functional.normalize(torch.randn(groups * n, c), dim=1)
    k = torch.nn.functional.normalize(torch.randn(groups * n, 1 + m, c), dim=2)
    valid = torch.rand(groups * n) > 0.2
    queue = torch.nn.functional.normalize(torch.randn(5, c), dim=1)
    logits = loss.contrastive_logits(q, k, valid, 0.2, intra, other_positives, queue, groups=groups)
    parts = [loss.contrastive_logits(q_g, k_g, v_g, 0.2, intra, other_positives, queue)
             for q_g, k_g, v_g in zip(q.chunk(groups), k.chunk(groups), valid.chunk(groups))]
    torch.testing.assert_close(logits, torch.cat(parts))
    value = loss.info_nce(logits, valid, groups)
    expected = torch.stack([loss.info_nce(part, v_g) for part, v_g in zip(parts, valid.chunk(groups))]).mean()
    torch.testing.assert_close(value, expected)


def test_virtual_gpus_must_divide_the_batch():
    with pytest.raises(ConfigError, match="virtual_gpus"):
        build_config(["--batch_size=12", "--virtual_gpus=8"])
    with pytest.raises(ConfigError, match="virtual_gpus"):
        build_config(["--batch_size=8", "--virtual_gpus=8"])  # one image per GPU: no negatives
    assert build_config(["--batch_size=16", "--virtual_gpus=8"]).virtual_gpus == 8


# ---- the whole step: 1 process x G = 2 equals 2 ranks x G = 1

def _batch(n: int, size: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    crop_q = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).repeat(n, 1)
    crop_k = torch.cat([torch.rand(n, 2, generator=g) * 0.2, 0.8 + torch.rand(n, 2, generator=g) * 0.2,
                        (torch.rand(n, 1, generator=g) > 0.5).float()], dim=1)
    views = [torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g) for _ in range(2)]
    return Batch(views[0], views[1], crop_q, crop_k)


def _step(cfg, encoders, inputs, permutation, queue):
    """One forward and backward: (loss, query gradients, BN running statistics of both encoders)."""
    encoder_q, encoder_k = encoders
    spec = MethodSpec.from_config(cfg)
    value, _, _ = loss_from_inputs(encoder_q, encoder_k, inputs, spec, permutation, queue)
    value.backward()
    grads = {name: p.grad.clone() for name, p in unwrap(encoder_q).named_parameters() if p.grad is not None}
    running = {f"{which}.{name}": t.clone() for which, module in (("q", unwrap(encoder_q)), ("k", encoder_k))
               for name, t in module.state_dict().items() if name.endswith(("running_mean", "running_var"))}
    return value.detach(), grads, running


def _whole_batch(cfg, n: int):
    """The inputs of 2n images and the shuffle's permutation, drawn once (seeded): what both sides use."""
    batch = _batch(2 * n, cfg.image_size, seed=1)
    spec = MethodSpec.from_config(cfg)
    generator = torch.Generator().manual_seed(2)
    noise = draw_noise(spec, 2 * n, "cpu", generator, torch.Generator().manual_seed(3))
    inputs = inputs_from_noise(batch, spec, noise)
    permutation = noise.shuffle  # shuffle-BN over the 2 virtual GPUs, drawn as the trainer draws it
    queue = torch.nn.functional.normalize(torch.randn(16, cfg.head_dim, generator=generator), dim=1) \
        if cfg.method == "mocov2" else None
    return inputs, permutation, queue


def _rank_slice(inputs, rank: int, n: int):
    rows = slice(rank * n, (rank + 1) * n)
    return type(inputs)(*[None if t is None else t[rows] for t in inputs])


def _rank_worker(rank: int, init_file: str, args: list, n: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    info = dist.init_distributed("cpu", init_method=f"file://{init_file}", timeout=datetime.timedelta(seconds=90))
    cfg = build_config([*args, f"--batch_size={n}", "--virtual_gpus=1"])
    encoder_q, encoder_k = build_encoders(cfg, info.device, True)
    ddp = torch.nn.parallel.DistributedDataParallel(encoder_q)  # averages the ranks' gradients, as the trainer
    whole = _whole_batch(build_config([*args, f"--batch_size={2 * n}", "--virtual_gpus=2"]), n)
    inputs, _, queue = whole
    # each rank draws shuffle-BN's permutation of the 2n images itself, from the generator every rank shares
    permutation = dist.draw_shuffle(n, torch.Generator().manual_seed(3), "cpu")
    result = _step(cfg, (ddp, encoder_k), _rank_slice(inputs, rank, n), permutation, queue)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    del ddp
    dist.shutdown()


@pytest.mark.parametrize("method", ["maskco", "mocov2"])
def test_one_process_with_two_virtual_gpus_equals_two_ranks(tmp_path, method):
    n = 4
    args = [*SMALL, f"--method={method}", *(["--queue_size=16"] if method == "mocov2" else [])]
    torch.multiprocessing.spawn(_rank_worker, args=(str(tmp_path / "init"), args, n, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    cfg = build_config([*args, f"--batch_size={2 * n}", "--virtual_gpus=2"])
    inputs, permutation, queue = _whole_batch(cfg, n)
    assert permutation is not None and inputs.valid.any()
    value, grads, running = _step(cfg, build_encoders(cfg, torch.device("cpu"), False), inputs, permutation, queue)

    torch.testing.assert_close(value, (ranks[0][0] + ranks[1][0]) / 2, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ranks[0][1].keys()
    for name in grads:  # DDP's gradient is the mean over ranks: the same on both
        scale = ranks[0][1][name].abs().max().item()  # summation order differs: relative to the gradient's size
        torch.testing.assert_close(grads[name], ranks[0][1][name], rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name in running:  # each rank's BatchNorm recorded its own batch; one process records their mean
        torch.testing.assert_close(running[name], (ranks[0][2][name] + ranks[1][2][name]) / 2,
                                   rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_one_process_shuffles_across_its_virtual_gpus():
    spec = MethodSpec.from_config(build_config([*SMALL, "--batch_size=8", "--virtual_gpus=2"]))
    noise = draw_noise(spec, 8, "cpu", torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
    assert noise.shuffle is not None and sorted(noise.shuffle.tolist()) == list(range(8))
    plain = MethodSpec.from_config(build_config([*SMALL, "--batch_size=8"]))
    assert draw_noise(plain, 8, "cpu", torch.Generator(), torch.Generator()).shuffle is None  # one GPU in all
