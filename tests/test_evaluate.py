"""maskco.evaluate: multi-layer features, linear heads (only they train), kNN, and the two CLIs on sample data."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from maskco.augment import normalize
from maskco import tool_args
from maskco.checkpoint import file_sha256
from maskco.evaluate import knn, linear, linear_augment
from maskco.evaluate.features import MultiLayerFeatures, source_classes

# DESIGN 4.8, ResNet-50 at 224 px: (channels, grid side) per stage -> ~9k dims each
R50_AT_224 = {"conv1": (64, 12), "res2": (256, 6), "res3": (512, 4), "res4": (1024, 3), "res5": (2048, 2)}
POOL = {"conv1": (10, 10, 4), "res2": (16, 8, 0), "res3": (13, 5, 0), "res4": (8, 3, 0), "res5": (6, 1, 0)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core test box, OpenMP threads spinning against other
    processes make these small convolutions several times slower than a single thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def resnet(arch: str = "resnet18", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    return model


def random_batches(count: int, batch: int, size: int, classes: int = 3, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(count)]


# ---- features

def test_pooled_sizes_per_stage_match_design_for_resnet50_at_224():
    with torch.device("meta"):  # shapes only: the same forward code, no 4 GFLOP CPU pass
        backbone = torchvision.models.resnet50(weights=None)
    features = MultiLayerFeatures(backbone)
    out = features(torch.zeros(2, 3, 224, 224, dtype=torch.uint8, device="meta"))
    assert {stage: value.shape for stage, value in out.items()} == {
        stage: (2, channels, grid, grid) for stage, (channels, grid) in R50_AT_224.items()}
    assert list(features.dims(224).values()) == [9216, 9216, 8192, 9216, 8192]


def test_multilayer_features_equal_pooled_torchvision_activations():
    backbone = resnet("resnet18")
    images = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    activations = {}
    backbone.maxpool.register_forward_hook(lambda m, inputs, out: activations.setdefault("conv1", inputs[0]))
    for stage, layer in zip(("res2", "res3", "res4", "res5"), (backbone.layer1, backbone.layer2,
                                                               backbone.layer3, backbone.layer4)):
        layer.register_forward_hook(lambda m, inputs, out, stage=stage: activations.setdefault(stage, out))
    with torch.no_grad():
        backbone.eval()(normalize(images.float() / 255))  # reference: torchvision's own forward
    out = MultiLayerFeatures(backbone)(images)
    assert list(out) == list(POOL)
    for stage, (kernel, stride, padding) in POOL.items():
        expected = F.avg_pool2d(activations[stage], kernel, stride, padding)  # [1, C, g, g], unflattened
        torch.testing.assert_close(out[stage], expected)
    assert not out["res5"].requires_grad


def test_lastlayer_is_the_global_pool_and_adaptive_keeps_the_grid():
    backbone = resnet("resnet18")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    last = MultiLayerFeatures(backbone, protocol="lastlayer")(images)
    with torch.no_grad():
        torch.testing.assert_close(last["res5"], backbone.eval()(normalize(images.float() / 255)))
    assert MultiLayerFeatures(backbone, pooling="adaptive").dims(64) == {
        "conv1": 64 * 144, "res2": 64 * 36, "res3": 128 * 16, "res4": 256 * 9, "res5": 512 * 4}
    with pytest.raises(ValueError, match="adaptive"):  # 64 px maps are smaller than the 224 px kernels
        MultiLayerFeatures(backbone).dims(64)


def test_bad_feature_arguments():
    with pytest.raises(ValueError, match="protocol"):
        MultiLayerFeatures(resnet(), protocol="finetune")
    with pytest.raises(ValueError, match="torchvision ResNet"):
        MultiLayerFeatures(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="uint8"):
        MultiLayerFeatures(resnet())(torch.zeros(1, 3, 64, 64))


# ---- linear heads

def test_only_the_heads_train_backbone_bit_identical_after_an_epoch():
    backbone = resnet("resnet18").train()  # even handed over in train mode, BN statistics must not move
    before = {key: value.clone() for key, value in backbone.state_dict().items()}
    features = MultiLayerFeatures(backbone, pooling="adaptive")
    heads = linear.LinearHeads(features.shapes(32), num_classes=3)
    heads_before = {key: value.clone() for key, value in heads.state_dict().items()}
    optimizer = torch.optim.SGD(heads.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    losses = linear.train_epoch(features, heads, random_batches(3, 4, 32), optimizer, torch.device("cpu"), 3)
    assert set(losses) == set(POOL) and all(value > 0 for value in losses.values())
    after = backbone.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before), "backbone changed"
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    changed = [key for key, value in heads.state_dict().items() if not torch.equal(value, heads_before[key])]
    assert any(key.endswith("fc.weight") for key in changed)  # the Linear layers learned
    assert any(key.endswith("norm.running_mean") for key in changed)  # the heads' BatchNorm trained


# ---- item 5: the multi-layer protocol is OpenSelfSup's configs/benchmarks/linear_classification/imagenet/
# r50_multihead.py, point by point (docs/transfer.md has the table with each source)

CLI_BASE = ["--random-init", "--arch", "resnet18", "--train", "t", "--val", "v"]


def test_heads_are_multiclshead_batchnorm2d_per_channel_before_flatten_for_resnet50_at_224():
    with torch.device("meta"):
        features = MultiLayerFeatures(torchvision.models.resnet50(weights=None))
    heads = linear.LinearHeads(features.shapes(224), num_classes=1000)
    assert list(heads.heads) == list(R50_AT_224)
    for stage, (channels, grid) in R50_AT_224.items():
        norm, flatten, fc = heads.heads[stage]
        assert type(norm) is nn.BatchNorm2d and norm.num_features == channels  # per channel, not per feature
        assert (norm.affine, norm.momentum, norm.eps, norm.track_running_stats) == (False, 0.1, 1e-5, True)
        assert isinstance(flatten, nn.Flatten) and fc.in_features == channels * grid * grid
    assert [head.fc.in_features for head in heads.heads.values()] == [9216, 9216, 8192, 9216, 8192]
    assert [name for name, _ in heads.named_parameters()] == [  # the norms have none
        f"heads.{stage}.fc.{kind}" for stage in R50_AT_224 for kind in ("weight", "bias")]


def test_head_normalises_each_channel_over_batch_and_positions_then_flattens():
    head = linear.LinearHeads({"res2": (4, 3, 3)}, num_classes=5).train()
    x = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1  # [N, C, g, g]
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    fc = head.heads["res2"].fc
    expected = ((x - mean) / torch.sqrt(var + 1e-5)).reshape(6, 36) @ fc.weight.T + fc.bias  # C, g, g order
    torch.testing.assert_close(head({"res2": x})["res2"], expected)
    norm = head.heads["res2"].norm
    torch.testing.assert_close(norm.running_mean, 0.1 * mean.flatten())  # momentum 0.1 from zeros


def test_lastlayer_head_is_a_plain_linear():
    last = linear.LinearHeads({"res5": (4,)}, num_classes=5, batchnorm=False)
    assert isinstance(last.heads["res5"], nn.Linear)
    assert last({"res5": torch.randn(3, 4)})["res5"].shape == (3, 5)
    with pytest.raises(ValueError, match="num_classes"):
        linear.LinearHeads({"res5": (4,)}, num_classes=1)


def test_fc_init_is_normal_std_0_01_and_zero_bias():
    heads = linear.LinearHeads({"conv1": (64, 12, 12), "res5": (2048,)}, num_classes=20, batchnorm=True)
    for stage in ("conv1", "res5"):
        fc = heads.heads[stage].fc
        assert abs(fc.weight.mean().item()) < 5e-4  # 9216 x 20 or 2048 x 20 draws of N(0, 0.01)
        assert fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert torch.equal(fc.bias, torch.zeros(20))


def test_training_views_get_color_jitter_then_lighting_then_normalize_and_validation_views_none(monkeypatch):
    calls = []

    def spy(name, function):
        def wrapped(x, params):
            out = function(x, params)
            calls.append((name, x.clone(), params, out.clone()))
            return out
        monkeypatch.setattr(linear_augment, name, wrapped)

    spy("color_jitter", linear_augment.color_jitter)
    spy("lighting", linear_augment.lighting)
    backbone = resnet("resnet18")
    features = MultiLayerFeatures(backbone, pooling="adaptive")
    heads = linear.LinearHeads(features.shapes(32), num_classes=3)
    inputs = []  # what the backbone gets (hooked after shapes(), whose meta twin would copy the hook)
    backbone.conv1.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    optimizer = linear.make_optimizer(heads, 0.1, 0.9, 1e-4, nesterov=True)
    batches = random_batches(1, 64, 32)
    linear.train_epoch(features, heads, batches, optimizer, torch.device("cpu"), 3,
                       augment=linear_augment.TrainAugment("cpu"))
    assert [call[0] for call in calls] == ["color_jitter", "lighting"]
    (_, jitter_in, jitter, jitter_out), (_, light_in, alpha, light_out) = calls
    torch.testing.assert_close(jitter_in, batches[0][0].float() / 255)  # after ToTensor
    assert linear_augment.COLOR_JITTER == (0.4, 0.4, 0.4, 0.0)
    assert bool(jitter.jitter.all()) and torch.equal(jitter.hue, torch.zeros(64))  # every image, hue 0
    for factor in (jitter.brightness, jitter.contrast, jitter.saturation):
        assert 0.6 <= factor.min() and factor.max() <= 1.4 and factor.std() > 0.1  # drawn per image
    assert torch.equal(light_in, jitter_out)  # lighting after the jitter, on [0, 1] values
    assert linear_augment.LIGHTING_STD == 0.1 and alpha.shape == (64, 3) and 0.05 < alpha.std() < 0.15
    torch.testing.assert_close(inputs[0], normalize(light_out))  # then Normalize, then the backbone

    calls.clear()
    inputs.clear()
    linear.evaluate(features, heads, batches, torch.device("cpu"), 3)
    assert calls == []  # validation: no colour jitter, no lighting
    torch.testing.assert_close(inputs[0], normalize(batches[0][0].float() / 255))


def test_lighting_matches_a_per_image_reference():
    generator = torch.Generator().manual_seed(0)
    x, alpha = torch.rand(4, 3, 5, 6, generator=generator), torch.randn(4, 3, generator=generator) * 0.1
    eigval = [0.2175, 0.0188, 0.0045]  # fb.resnet.torch datasets/imagenet.lua; OpenSelfSup's Lighting
    eigvec = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    expected = x.clone()
    for n in range(4):  # one image at a time: rgb[c] = sum_j eigvec[c][j] * alpha[j] * eigval[j]
        for c in range(3):
            expected[n, c] += sum(eigvec[c][j] * alpha[n, j].item() * eigval[j] for j in range(3))
    torch.testing.assert_close(linear_augment.lighting(x, alpha), expected)


def test_optimizer_is_nesterov_sgd_with_momentum_0_9_decaying_every_head_parameter():
    heads = linear.LinearHeads({"conv1": (4, 3, 3), "res5": (8, 2, 2)}, num_classes=5)
    args = tool_args.linear_args(CLI_BASE)
    optimizer = linear.make_optimizer(heads, args.lr, args.momentum, args.weight_decay, args.nesterov)
    (group,) = optimizer.param_groups
    assert (group["nesterov"], group["momentum"], group["dampening"], group["weight_decay"]) == (True, 0.9, 0, 1e-4)
    assert {id(p) for p in group["params"]} == {id(p) for p in heads.parameters()}  # weights and biases decayed
    assert len(group["params"]) == 4  # two Linear layers; the affine=False norms have no parameters
    last = tool_args.linear_args(CLI_BASE + ["--protocol", "lastlayer"])  # MoCo's: plain momentum
    assert (last.nesterov, last.weight_decay) == (False, 0.0)
    with pytest.raises(ValueError, match="momentum"):
        linear.make_optimizer(heads, 0.1, 0.0, 1e-4, nesterov=True)


def openselfsup_step_lr(epoch: int, lr: float, steps) -> float:
    """mmcv's StepLrUpdaterHook (gamma 0.1, by epoch): lr * 0.1 ** (index of the first step > epoch)."""
    return lr * 0.1 ** next((i for i, step in enumerate(steps) if epoch < step), len(steps))


def test_lr_schedule_is_0_1_divided_by_10_at_30_and_60_over_90_epochs():
    args = tool_args.linear_args(CLI_BASE)
    assert (args.lr, args.milestones, args.epochs) == (0.1, [30, 60], 90)  # [paper]; the config file: lr 0.01
    ours = [linear.step_lr(epoch, args.lr, args.milestones) for epoch in range(args.epochs)]
    assert ours == pytest.approx([openselfsup_step_lr(epoch, 0.1, [30, 60, 90]) for epoch in range(90)])
    assert ours[0] == ours[29] == pytest.approx(0.1) and ours[30] == ours[59] == pytest.approx(0.01)
    assert ours[60] == ours[89] == pytest.approx(0.001)
    last = tool_args.linear_args(CLI_BASE + ["--protocol", "lastlayer", "--lr", "10"])
    assert (last.epochs, last.lr, last.weight_decay, last.milestones) == (100, 10.0, 0.0, [60, 80])


# The config's values (open-mmlab/mmselfsup, the former OpenSelfSup, configs/benchmarks/linear_classification/
# imagenet/r50_multihead.py): SGD momentum 0.9, weight_decay 0.0001, nesterov True; total_epochs 90;
# imgs_per_gpu 32 x 8 GPUs; RandomResizedCrop(224); ColorJitter + Lighting in train_pipeline; pool 'specified'.
OPENSELFSUP = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True, "epochs": 90, "batch_size": 256,
               "image_size": 224, "pooling": "fixed", "color_jitter": True, "lighting": True}


def test_multilayer_defaults_are_the_openselfsup_config_but_the_papers_lr():
    args = vars(tool_args.linear_args(CLI_BASE))
    assert {key for key, value in OPENSELFSUP.items() if args[key] != value} == {"lr"}  # 0.1: the paper's text
    grey = tool_args.linear_args(CLI_BASE + ["--no-color-jitter", "--no-lighting", "--no-nesterov"])
    assert (grey.color_jitter, grey.lighting, grey.nesterov) == (False, False, False)
    last = tool_args.linear_args(CLI_BASE + ["--protocol", "lastlayer"])  # MoCo's main_lincls: crop + flip only
    assert (last.color_jitter, last.lighting) == (False, False)


def test_topk_correct_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 7, generator=generator), torch.randint(0, 7, (50,), generator=generator)
    ranks = [(logits[i] > logits[i, labels[i]]).sum().item() for i in range(50)]  # 0 = label scored highest
    expected = [sum(r < 1 for r in ranks), sum(r < 5 for r in ranks)]
    assert linear.topk_correct(logits, labels).tolist() == expected


# ---- kNN

def reference_knn_scores(bank, bank_labels, queries, num_classes, k, temperature):
    scores = torch.zeros(len(queries), num_classes)
    for i, query in enumerate(queries):
        similarity = bank @ query  # [N]
        for j in similarity.argsort(descending=True)[:k].tolist():
            scores[i, bank_labels[j]] += torch.exp(similarity[j] / temperature)
    return scores


def unit_rows(n: int, c: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, c, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("k", [1, 5, 40])  # 40 > bank size: padding
def test_knn_scores_match_a_loop(k):
    bank, queries = unit_rows(30, 8, 0), unit_rows(9, 8, 1)
    bank_labels = torch.arange(30) % 4
    scores = knn.knn_scores(bank, bank_labels, queries, 4, k=k, temperature=0.1)
    torch.testing.assert_close(scores, reference_knn_scores(bank, bank_labels, queries, 4, k, 0.1))
    chunked = knn.vote(*knn.nearest(bank, bank_labels, queries, k, max_elements=60), 4, 0.1)  # 2 queries a chunk
    torch.testing.assert_close(chunked, scores)


def test_knn_accuracy_on_pairs_restores_train_mode():
    backbone = resnet("resnet18").train()
    batches = random_batches(2, 6, 32)
    result = knn.knn_accuracy(backbone, batches, batches, torch.device("cpu"), k=1)
    assert result["top1"] == 100.0  # every query finds itself (similarity 1) in the bank
    assert 0 <= result["top5"] <= 100 and backbone.training
    with pytest.raises(ValueError, match="unlabelled"):
        knn.knn_accuracy(backbone, [(batches[0][0], torch.full((6,), -1))], batches, torch.device("cpu"))


# Run by two fresh interpreters (a file:// rendezvous): rank 0 and rank 1 hold uneven shards of one bank
# and one query set, as evaluation loaders give them (16 + 15 bank rows, 6 + 5 queries).
KNN_WORKER = """
import datetime, os, sys
import torch
from torch.nn import functional as F
from maskco import dist
from maskco.evaluate import knn
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
dist.init_distributed("cpu", "file://" + sys.argv[1], datetime.timedelta(seconds=60))
bank = F.normalize(torch.randn(31, 8, generator=torch.Generator().manual_seed(0)), dim=1)
queries = F.normalize(torch.randn(11, 8, generator=torch.Generator().manual_seed(1)), dim=1)
mine, queries_mine = (slice(0, 16), queries[:6]) if rank == 0 else (slice(16, 31), queries[6:])
scores = knn.knn_scores(bank[mine], (torch.arange(31) % 5)[mine], queries_mine, 5, k=7, temperature=0.07,
                        distributed=True)
torch.save(scores, sys.argv[2] + str(rank))
dist.shutdown()
"""


def test_knn_sharded_over_two_ranks_equals_one_process(tmp_path):
    out = str(tmp_path / "scores")
    workers = [subprocess.Popen([sys.executable, "-c", KNN_WORKER, str(tmp_path / "init"), out],
                                env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
               for rank in range(2)]
    try:
        assert [worker.wait(timeout=300) for worker in workers] == [0, 0]
    finally:
        for worker in workers:
            worker.kill()
    expected = knn.knn_scores(unit_rows(31, 8, 0), torch.arange(31) % 5, unit_rows(11, 8, 1), 5, k=7, temperature=0.07)
    for rank in range(2):  # every rank holds every query's scores
        torch.testing.assert_close(torch.load(out + str(rank)), expected)


# ---- the CLIs and knn_monitor on the sample data (tiny: 24 images, 32 px, resnet18)

def linear_args(train, val, out_dir, *extra):
    return ["--random-init", "--arch", "resnet18", "--train", train, "--val", val, "--image-size", "32",
            "--pooling", "adaptive", "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--out-dir", str(out_dir), *extra]


def test_linear_cli_trains_resumes_and_reports(sample_root, tmp_path):
    result = linear.main(linear_args(sample_root, sample_root, tmp_path, "--epochs", "1"))
    assert set(result) == set(POOL) | {"images"} and result["images"] == 24
    assert all(0 <= acc[k] <= 100 for stage, acc in result.items() if stage != "images" for k in ("top1", "top5"))
    state = torch.load(tmp_path / linear.LAST, weights_only=True)
    assert state["epoch"] == 1 and state["num_classes"] == 3
    assert state["optimizer"]["param_groups"][0]["nesterov"] is True  # the CLI builds the protocol's SGD

    linear.main(linear_args(sample_root, sample_root, tmp_path, "--epochs", "2", "--protocol", "multilayer"))
    lines = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert any(line.get("resumed") for line in lines)
    assert [line["epoch"] for line in lines if "lr" in line] == [1, 2]
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["epochs"] == 2 and 0 <= saved["res5"]["top1"] <= 100


def test_linear_refuses_resume_with_other_class_count(sample_root, tmp_path):
    shapes = {"res5": [512]}
    stale = {"format": linear.FORMAT, "epoch": 1, "protocol": "lastlayer", "shapes": shapes, "num_classes": 1000,
             "heads": {}, "optimizer": {}, "args": {}}
    torch.save(stale, tmp_path / linear.LAST)
    with pytest.raises(ValueError, match="1000 classes.*has 3"):
        linear.main(linear_args(sample_root, sample_root, tmp_path, "--protocol", "lastlayer"))
    with pytest.raises(ValueError, match="feature shapes"):
        linear.resume_state(str(tmp_path / linear.LAST), 1000, {"res5": [2048]}, "lastlayer")
    torch.save({"something": "else"}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a linear-evaluation checkpoint"):
        linear.resume_state(str(tmp_path / "foreign.pt"), 3, shapes, "lastlayer")
    torch.save({**stale, "format": "maskco-linear-v1", "dims": {"res5": 512}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="BatchNorm1d"):
        linear.resume_state(str(tmp_path / "old.pt"), 1000, shapes, "lastlayer")


@pytest.fixture
def two_backbones(tmp_path) -> list[str]:
    """Two exported torchvision ResNet-18 backbones with different weights, in one run folder."""
    paths = []
    os.makedirs(tmp_path / "pretrain")
    for seed in (0, 1):
        paths.append(str(tmp_path / "pretrain" / f"backbone{seed}.pth"))
        torch.save(resnet("resnet18", seed).state_dict(), paths[-1])
    return paths


def _on(checkpoint_path: str, train: str, *extra: str) -> list[str]:
    args = linear_args(train, train, "-", "--epochs", "1", "--protocol", "lastlayer", *extra)
    args[:3] = ["--checkpoint", checkpoint_path]  # instead of --random-init --arch resnet18
    return [a for a in args if a not in ("--out-dir", "-")]


def test_linear_refuses_to_resume_the_heads_of_another_checkpoint(sample_root, tmp_path, two_backbones):
    first, second = two_backbones
    linear.main([*_on(first, sample_root), "--out-dir", str(tmp_path / "same")])
    with pytest.raises(ValueError, match="another evaluation.*sha256"):
        linear.main([*_on(second, sample_root), "--out-dir", str(tmp_path / "same")])


def test_linear_default_out_dir_is_one_per_checkpoint(sample_root, tmp_path, two_backbones, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in two_backbones:
        linear.main(_on(path, sample_root))
    results = [json.load(open(path)) for path in glob.glob("runs/linear/*/results.json")]
    assert sorted(r["identity"]["sha256"] for r in results) == sorted(map(file_sha256, two_backbones))
    assert sorted(r["checkpoint"] for r in results) == sorted(two_backbones)


@pytest.mark.parametrize("option, value", [("--lr", "-0.1"), ("--lr", "nan"), ("--weight-decay", "-1"),
                                           ("--momentum", "1.0")])
def test_linear_refuses_values_that_make_no_sense(option, value):
    with pytest.raises(SystemExit):
        tool_args.linear_args([*CLI_BASE, option, value])


def test_linear_refuses_unlabelled_data(sample_root, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for folder, _, files in os.walk(sample_root):
        for name in files:
            if name.endswith(".jpg"):
                shutil.copy(os.path.join(folder, name), flat / name)
    with pytest.raises(ValueError, match="no labels"):
        linear.main(linear_args(str(flat), sample_root, tmp_path / "out", "--epochs", "1"))
    with pytest.raises(ValueError, match="no labels"):
        source_classes(str(flat), "--train")


def test_knn_monitor_on_sample_data(sample_root):
    backbone = resnet("resnet18").train()
    result = knn.knn_monitor(backbone, sample_root, sample_root, image_size=32, device=torch.device("cpu"),
                             batch_size=8, workers=0)
    assert set(result) == {"top1", "top5", "top1_k20"} and all(0 <= value <= 100 for value in result.values())
    assert backbone.training
