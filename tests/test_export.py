"""maskco.export: torchvision and detectron2 exports of the query backbone, and reading backbones back."""
import os
import pickle

import numpy
import pytest
import torch
import torchvision
from torch import nn

from maskco import export, model
from maskco.checkpoint import FORMAT

# detectron2 R50 (torchvision-style Bottleneck: stride in the 3x3), blocks per stage 3/4/6/3; written out here
# rather than derived from the exporter's renaming, so a renaming mistake cannot hide in both.
R50_BLOCKS = {"res2": 3, "res3": 4, "res4": 6, "res5": 3}
R50_WIDTH = {"res2": 64, "res3": 128, "res4": 256, "res5": 512}  # bottleneck width; output is 4x
BN = ("weight", "bias", "running_mean", "running_var")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core test box, OpenMP threads spinning against other
    processes make small convolutions several times slower than a single thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def r50_c4_expected_shapes() -> dict[str, tuple]:
    shapes = {"backbone.stem.conv1.weight": (64, 3, 7, 7)}
    shapes.update({f"backbone.stem.conv1.norm.{p}": (64,) for p in BN})
    in_channels = 64
    for stage, blocks in R50_BLOCKS.items():
        prefix = "roi_heads" if stage == "res5" else "backbone"  # C4: res5 is the box head
        width = R50_WIDTH[stage]
        for block in range(blocks):
            name = f"{prefix}.{stage}.{block}"
            convs = {"conv1": (width, in_channels, 1, 1), "conv2": (width, width, 3, 3),
                     "conv3": (4 * width, width, 1, 1)}
            if block == 0:
                convs["shortcut"] = (4 * width, in_channels, 1, 1)
            for conv, shape in convs.items():
                shapes[f"{name}.{conv}.weight"] = shape
                shapes.update({f"{name}.{conv}.norm.{p}": (shape[0],) for p in BN})
            in_channels = 4 * width
    return shapes


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default statistics so that a dropped or swapped buffer changes the features."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def fake_checkpoint(arch: str = "resnet18", config_arch: str | None = None) -> tuple[dict, nn.Module]:
    """A pretraining checkpoint in the documented format, with a torchvision ResNet as the query backbone."""
    torch.manual_seed(0)
    backbone = randomised(getattr(torchvision.models, arch)(weights=None))
    backbone.fc = nn.Identity()
    encoder_q = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    encoder_q.update({"mph.reduce.weight": torch.randn(4, 4), "head.0.weight": torch.randn(8, 512)})
    encoder_k = {key: value + 1 if value.is_floating_point() else value for key, value in encoder_q.items()}
    state = {"format": FORMAT, "config": {"arch": config_arch or arch, "image_size": 224}, "git": "test",
             "epoch": 1, "step": 10, "encoder_q": encoder_q, "encoder_k": encoder_k, "optimizer": {}, "scaler": {}}
    return state, backbone.eval()


@pytest.fixture
def checkpoint_file(tmp_path):
    state, backbone = fake_checkpoint()
    path = str(tmp_path / "checkpoint_last.pt")
    torch.save(state, path)
    return path, backbone


def test_torchvision_export_loads_strict_and_gives_the_query_backbones_features(checkpoint_file, tmp_path):
    path, query_backbone = checkpoint_file
    record = export.main([path, "--out-dir", str(tmp_path / "out")])
    weights = torch.load(record["torchvision"], map_location="cpu", weights_only=True)
    assert not any(key.startswith(("fc.", "backbone.", "mph", "head")) for key in weights)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    model.load_state_dict(weights, strict=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(images), query_backbone(images))  # query, not key: same bits
    assert record["arch"] == "resnet18"
    assert sorted(os.listdir(tmp_path / "out")) == [export.DETECTRON2_FILE, export.TORCHVISION_FILE]  # no temp files


def test_load_backbone_reads_checkpoints_and_exported_dicts(checkpoint_file, tmp_path):
    path, query_backbone = checkpoint_file
    loaded = export.load_backbone(path)
    plain = str(tmp_path / "plain.pth")
    export.export_torchvision(loaded.state_dict(), plain)
    with_fc = str(tmp_path / "torchvision_with_fc.pth")  # torchvision's own weights carry a classifier
    torch.save({**loaded.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, with_fc)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = query_backbone(images)
        for source in (path, plain, with_fc):
            assert torch.equal(export.load_backbone(source).eval()(images), expected), source


def test_checkpoint_of_another_architecture_is_a_clear_error(checkpoint_file, tmp_path):
    path, _ = checkpoint_file
    with pytest.raises(ValueError, match=r"checkpoint_last\.pt.*expected arch resnet50.*resnet18"):
        export.load_backbone(path, arch="resnet50")
    mislabelled = str(tmp_path / "mislabelled.pt")  # config says resnet50, weights are resnet18
    torch.save(fake_checkpoint("resnet18", config_arch="resnet50")[0], mislabelled)
    with pytest.raises(ValueError, match=r"mislabelled\.pt: expected resnet50 weights .*found resnet18 weights"):
        export.load_backbone(mislabelled)
    plain = str(tmp_path / "r18.pth")
    torch.save(fake_checkpoint()[1].state_dict(), plain)
    with pytest.raises(ValueError, match=r"r18\.pth: expected resnet34 weights.*found resnet18"):
        export.load_backbone(plain, arch="resnet34")


def test_garbage_and_non_resnet_inputs_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"garbage\.pth is not a readable torch file"):
        export.load_backbone(str(garbage))
    with pytest.raises(ValueError, match="does not exist"):
        export.load_backbone(str(tmp_path / "missing.pth"))
    vit = str(tmp_path / "vit.pth")
    torch.save({"encoder.layers.0.weight": torch.zeros(3, 3)}, vit)
    with pytest.raises(ValueError, match=r"matches no torchvision ResNet.*no ResNet stem"):
        export.load_backbone(vit)
    with pytest.raises(ValueError, match="matches no torchvision ResNet"):
        export.export_torchvision({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "x.pth"))
    assert not os.path.exists(tmp_path / "x.pth")


def test_detectron2_r50_c4_keys_shapes_and_values(tmp_path):
    torch.manual_seed(0)
    backbone = randomised(torchvision.models.resnet50(weights=None))
    backbone.fc = nn.Identity()
    path = str(tmp_path / "r50.pkl")
    export.export_detectron2(backbone.state_dict(), path)
    with open(path, "rb") as handle:
        payload = pickle.load(handle)
    assert payload["__author__"] == "maskco" and payload["matching_heuristics"] is False
    model = payload["model"]
    expected = r50_c4_expected_shapes()
    assert set(model) == set(expected)
    assert {key: value.shape for key, value in model.items()} == expected
    assert all(isinstance(value, numpy.ndarray) and value.dtype == numpy.float32 for value in model.values())
    state = backbone.state_dict()  # values: a few spot checks of the renaming, MoCo's table
    for torchvision_key, detectron2_key in [
        ("conv1.weight", "backbone.stem.conv1.weight"),
        ("bn1.running_var", "backbone.stem.conv1.norm.running_var"),
        ("layer1.0.downsample.0.weight", "backbone.res2.0.shortcut.weight"),
        ("layer1.0.downsample.1.bias", "backbone.res2.0.shortcut.norm.bias"),
        ("layer3.5.bn2.running_mean", "backbone.res4.5.conv2.norm.running_mean"),
        ("layer4.2.conv3.weight", "roi_heads.res5.2.conv3.weight"),
    ]:
        numpy.testing.assert_array_equal(model[detectron2_key], state[torchvision_key].numpy())


def test_detectron2_fpn_layout_and_encoder_prefix(tmp_path):
    state, _ = fake_checkpoint()
    path = str(tmp_path / "fpn.pkl")
    export.export_detectron2(state["encoder_q"], path, layout="fpn")  # an Encoder state dict: MPH/head dropped
    with open(path, "rb") as handle:
        model = pickle.load(handle)["model"]
    assert all(key.startswith("backbone.bottom_up.") for key in model)
    assert "backbone.bottom_up.res5.1.conv2.norm.weight" in model  # BasicBlock: conv1, conv2 only
    assert not any("num_batches_tracked" in key or "mph" in key or "head" in key for key in model)
    with pytest.raises(ValueError, match="layout"):
        export.export_detectron2(state["encoder_q"], path, layout="c5")


def test_reads_the_encoder_of_maskco_model(tmp_path):
    from maskco.model import Encoder

    torch.manual_seed(0)
    encoder = Encoder("resnet18", mph="conv", head_hidden=64, head_dim=16)
    path = str(tmp_path / "checkpoint_last.pt")
    torch.save({"format": FORMAT, "config": {"arch": "resnet18"}, "encoder_q": encoder.state_dict()}, path)
    loaded = export.load_backbone(path).state_dict()
    expected = {key[len("backbone."):]: value for key, value in encoder.state_dict().items()
                if key.startswith("backbone.")}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("stem, width", [("cifar", 0.25), ("imagenet", 0.5), ("cifar", 1.0)])
def test_small_stem_and_width_round_trip_through_backbone_pth(tmp_path, stem, width):
    """A backbone torchvision cannot hold is written as backbone.pth with its shape and read back whole."""
    torch.manual_seed(0)
    encoder = model.Encoder("resnet18", mph="none", stem=stem, width=width, head_hidden=16, head_dim=8)
    path = export.export_backbone(encoder.state_dict(), str(tmp_path), "resnet18", stem, width)
    assert os.path.basename(path) == export.BACKBONE_FILE
    loaded = export.load_backbone(path).eval()
    assert loaded.conv1.stride == ((1, 1) if stem == "cifar" else (2, 2))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), encoder.backbone.eval()(x))
    with pytest.raises(ValueError, match="resnet34"):
        export.load_backbone(path, "resnet34")


def test_export_cli_refuses_detectron2_for_a_small_stem_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    encoder = model.Encoder("resnet18", mph="none", stem="cifar", width=0.25, head_hidden=16, head_dim=8)
    source = export.export_backbone(encoder.state_dict(), str(tmp_path), "resnet18", "cifar", 0.25)
    record = export.main([source, "--out-dir", str(tmp_path / "out")])
    assert record["backbone"].endswith(export.BACKBONE_FILE) and record["stem"] == "cifar"
    assert not os.path.exists(tmp_path / "out" / export.DETECTRON2_FILE)
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line says why


def test_torchvision_shape_still_exports_for_torchvision(tmp_path):
    torch.manual_seed(0)
    encoder = model.Encoder("resnet18", mph="none", head_hidden=16, head_dim=8)
    path = export.export_backbone(encoder.state_dict(), str(tmp_path), "resnet18")
    assert os.path.basename(path) == export.TORCHVISION_FILE
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
