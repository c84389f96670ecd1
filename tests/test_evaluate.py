"""maskco.evaluate: multi-layer features, linear heads (only they train), kNN, and the two CLIs on sample data."""
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
from maskco.evaluate import knn, linear
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
        stage: (2, channels * grid * grid) for stage, (channels, grid) in R50_AT_224.items()}
    assert [value.shape[1] for value in out.values()] == [9216, 9216, 8192, 9216, 8192]


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
        expected = F.avg_pool2d(activations[stage], kernel, stride, padding).flatten(1)
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
    heads = linear.LinearHeads(features.dims(32), num_classes=3)
    heads_before = {key: value.clone() for key, value in heads.state_dict().items()}
    optimizer = torch.optim.SGD(heads.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    losses = linear.train_epoch(features, heads, random_batches(3, 4, 32), optimizer, torch.device("cpu"), 3)
    assert set(losses) == set(POOL) and all(value > 0 for value in losses.values())
    after = backbone.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before), "backbone changed"
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    changed = [key for key, value in heads.state_dict().items() if not torch.equal(value, heads_before[key])]
    assert any(key.endswith("1.weight") for key in changed)  # the Linear layers learned
    assert any(key.endswith("running_mean") for key in changed)  # the heads' BatchNorm trained


def test_heads_structure_per_protocol():
    heads = linear.LinearHeads({"res2": 8, "res5": 4}, num_classes=5)
    bn, fc = heads.heads["res2"]
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and fc.out_features == 5
    last = linear.LinearHeads({"res5": 4}, num_classes=5, batchnorm=False)
    assert isinstance(last.heads["res5"], nn.Linear)
    assert heads({"res2": torch.randn(3, 8), "res5": torch.randn(3, 4)})["res5"].shape == (3, 5)
    with pytest.raises(ValueError, match="num_classes"):
        linear.LinearHeads({"res5": 4}, num_classes=1)


def test_step_lr_and_protocol_defaults():
    assert [linear.step_lr(e, 0.1, [30, 60]) for e in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    base = ["--random-init", "--arch", "resnet18", "--train", "t", "--val", "v"]
    multi = linear.parse_args(base)
    assert (multi.epochs, multi.lr, multi.weight_decay, multi.milestones) == (90, 0.1, 1e-4, [30, 60])
    last = linear.parse_args(base + ["--protocol", "lastlayer", "--lr", "10"])
    assert (last.epochs, last.lr, last.weight_decay, last.milestones) == (100, 10.0, 0.0, [60, 80])


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

    linear.main(linear_args(sample_root, sample_root, tmp_path, "--epochs", "2", "--protocol", "multilayer"))
    lines = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert any(line.get("resumed") for line in lines)
    assert [line["epoch"] for line in lines if "lr" in line] == [1, 2]
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["epochs"] == 2 and 0 <= saved["res5"]["top1"] <= 100


def test_linear_refuses_resume_with_other_class_count(sample_root, tmp_path):
    dims = {"res5": 512}
    stale = {"format": linear.FORMAT, "epoch": 1, "protocol": "lastlayer", "dims": dims, "num_classes": 1000,
             "heads": {}, "optimizer": {}, "args": {}}
    torch.save(stale, tmp_path / linear.LAST)
    with pytest.raises(ValueError, match="1000 classes.*has 3"):
        linear.main(linear_args(sample_root, sample_root, tmp_path, "--protocol", "lastlayer"))
    with pytest.raises(ValueError, match="feature sizes"):
        linear.resume_state(str(tmp_path / linear.LAST), 1000, {"res5": 2048}, "lastlayer")
    torch.save({"something": "else"}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a linear-evaluation checkpoint"):
        linear.resume_state(str(tmp_path / "foreign.pt"), 3, dims, "lastlayer")


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
    assert set(result) == {"top1", "top5"} and all(0 <= value <= 100 for value in result.values())
    assert backbone.training
