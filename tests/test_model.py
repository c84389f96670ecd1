"""maskco.model: encoder shapes and gradients, MPH variants, EMA key encoder, backbone export, optimizer groups."""
import math

import pytest
import torch
import torchvision
from torch import nn

from maskco import export, model
from maskco.mph import AttentionMPH, sine_position_embedding


def small_encoder(**overrides) -> model.Encoder:
    """resnet18 with a narrow MPH and head: the same code paths as the default at a fraction of the cost."""
    kwargs = dict(arch="resnet18", mph="attn", mph_width=64, mph_heads=4, head_hidden=64, head_dim=32)
    kwargs.update(overrides)
    return model.Encoder(**kwargs)


def random_boxes(n: int, num_boxes: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, num_boxes, 4]`` xyxy view-pixel boxes of at least 8 px, some reaching past the view."""
    xy0 = torch.rand(n, num_boxes, 2, generator=generator) * (size - 8)
    wh = 8 + torch.rand(n, num_boxes, 2, generator=generator) * size * 0.6
    return torch.cat((xy0, xy0 + wh), dim=-1)


def perturb_(module: nn.Module, seed: int) -> None:
    """Random parameters and BN statistics, so the zero-initialised parts do something and EMA tests bite."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            tensor.copy_(0.5 + 0.1 * torch.randn(tensor.shape, generator=generator) if tensor.dim() == 1
                         else 0.05 * torch.randn(tensor.shape, generator=generator))


def test_shapes_and_unit_norms():
    encoder = small_encoder()
    x = torch.randn(2, 3, 64, 64)
    boxes = random_boxes(2, 5, 64, torch.Generator().manual_seed(0))
    for out, length in ((encoder(x, boxes), 5), (encoder(x), 1)):
        assert out.shape == (2, length, 32) and out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, length))


@pytest.mark.parametrize("mph", model.MPH_KINDS)
def test_every_query_parameter_gets_a_gradient_and_keys_get_none(mph):
    encoder_q = small_encoder(mph=mph)
    perturb_(encoder_q, seed=0)  # zero-initialised expand / BN gamma would otherwise stop the MPH gradients
    encoder_k = model.build_key_encoder(encoder_q)
    x = torch.randn(2, 3, 32, 32)  # C5 is 1x1: gradient flow does not depend on the map size
    boxes = random_boxes(2, 3, 32, torch.Generator().manual_seed(1))
    q = encoder_q(x, boxes)  # [2, 3, 32]
    k = encoder_k(x, boxes)  # [2, 3, 32]
    assert not k.requires_grad
    (q * torch.randn_like(q)).sum().backward()
    missing = [name for name, p in encoder_q.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert not any(p.requires_grad for p in encoder_k.parameters())


def test_momentum_update_is_the_lerp_on_params_and_copies_buffers():
    encoder_q = small_encoder(mph="conv")  # conv MPH: BN buffers inside the MPH too
    encoder_k = model.build_key_encoder(encoder_q)
    perturb_(encoder_q, seed=1)
    state_k0 = {name: t.clone() for name, t in encoder_k.state_dict().items()}
    state_q = encoder_q.state_dict()
    model.momentum_update(encoder_k, encoder_q, 1.0)  # keeps params ...
    for name, p in encoder_k.named_parameters():
        assert torch.equal(p, state_k0[name]), name
    for name, b in encoder_k.named_buffers():  # ... and always takes the query's BN statistics
        assert torch.equal(b, state_q[name]), name
    model.momentum_update(encoder_k, encoder_q, 0.9)
    for name, p in encoder_k.named_parameters():
        torch.testing.assert_close(p, 0.9 * state_k0[name] + 0.1 * state_q[name])
    model.momentum_update(encoder_k, encoder_q, 0.0)  # copies
    for name, t in encoder_k.state_dict().items():
        assert torch.equal(t, state_q[name]), name


def test_key_encoder_ema_follows_tensors_replaced_by_to():
    encoder_q = small_encoder(mph="none")
    encoder_k = model.build_key_encoder(encoder_q)
    ema = model.KeyEncoderEMA(encoder_k, encoder_q)
    ema(0.5)  # holds the float32 tensors
    encoder_q.double(), encoder_k.double()  # replaces buffers (and parameter data) with float64 ones
    perturb_(encoder_q, seed=2)
    ema(0.0)
    for (name, t_k), t_q in zip(encoder_k.state_dict().items(), encoder_q.state_dict().values()):
        assert torch.equal(t_k, t_q), name


def test_momentum_update_rejects_bad_arguments():
    encoder_q = small_encoder(mph="none")
    with pytest.raises(ValueError, match="momentum"):
        model.momentum_update(model.build_key_encoder(encoder_q), encoder_q, 1.5)
    with pytest.raises(ValueError, match="encoder_k"):
        model.momentum_update(small_encoder(mph="conv"), encoder_q, 0.9)


def test_mph_none_is_the_trunk():
    encoder = small_encoder(mph="none")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(encoder.features(x), encoder.trunk(x))


@pytest.mark.parametrize("mph", ["attn", "conv"])
def test_mph_is_the_identity_at_init(mph):
    """Zero-initialised expand (attn) / last-BN gamma (conv): training starts from MoCo's trunk.
    The conv MPH's final ReLU is a no-op on C5, which already ends in a ReLU."""
    encoder = small_encoder(mph=mph)
    c5 = encoder.trunk(torch.randn(2, 3, 64, 64))  # [2, 512, 2, 2]
    assert torch.equal(encoder.mph(c5), c5)


@pytest.mark.parametrize("size", [3, 4, 7, 14])  # 96-128 px resnet18, 224 px, 224 px dilated
def test_attention_mph_runs_at_trainer_sizes_and_keeps_channels_last(size):
    mph = AttentionMPH(channels=64, width=32, layers=2, heads=4)
    perturb_(mph, seed=3)
    x = torch.randn(2, 64, size, size).to(memory_format=torch.channels_last)
    y = mph(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # per-sample: the batch does not mix (no BN, attention within each image)
    torch.testing.assert_close(mph(x[1:]), y[1:], rtol=1e-5, atol=1e-5)


def test_sine_position_embedding_matches_detr():
    pos = sine_position_embedding(3, 4, 8).view(3, 4, 8)  # [H, W, dim]
    y, x = 2, 1  # row 2 of 3, column 1 of 4 (0-based)
    freq = [10000 ** (2 * (i // 2) / 4) for i in range(4)]
    def encode(coord, n):  # DETR: normalised cumsum coordinate, sin on even channels, cos on odd
        a = (coord + 1) / (n + 1e-6) * 2 * math.pi
        return [math.sin(a / f) if i % 2 == 0 else math.cos(a / f) for i, f in enumerate(freq)]
    torch.testing.assert_close(pos[y, x], torch.tensor(encode(y, 3) + encode(x, 4)))
    with pytest.raises(ValueError, match="dim"):
        sine_position_embedding(3, 3, 6)


def test_roi_fused_matches_reference():
    torch.manual_seed(0)
    fused = small_encoder(mph="none", roi_fused=True)
    reference = small_encoder(mph="none", roi_fused=False)
    reference.load_state_dict(fused.state_dict())
    features = torch.randn(2, 512, 4, 4, requires_grad=True)
    boxes = random_boxes(2, 6, 128, torch.Generator().manual_seed(4))
    out_f, out_r = fused.embed(features, boxes), reference.embed(features, boxes)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out_f)
    grad_f, = torch.autograd.grad((out_f * weights).sum(), features)
    grad_r, = torch.autograd.grad((out_r * weights).sum(), features)
    torch.testing.assert_close(grad_f, grad_r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dilated, stride", [(False, 32), (True, 16)])
def test_a_point_box_on_a_cells_receptive_centre_pools_that_cell(dilated, stride):
    """Cell (row i, column j) is centred on pixel (stride * j, stride * i), at + 0.5 in continuous coordinates
    (tests/test_alignment.py measures it): a point box there pools exactly that cell by default, while
    ``half_pixel`` reads the point as stride / 2 - 0.5 px further up-left, between cells."""
    features = (torch.arange(4.0)[None, :] + 10 * torch.arange(4.0)[:, None]).expand(1, 2048, 4, 4)  # x + 10 y
    point = torch.tensor([[[2 * stride + 0.5, stride + 0.5] * 2]])  # [1, 1, 4]: zero-size box on cell (1, 2)
    for centering, expected in (("receptive", 2 + 10 * 1), ("half_pixel", 1.5 + 10 * 0.5 + 11 * 0.5 / stride)):
        encoder = model.Encoder("resnet50", dilated=dilated, mph="none", roi_centering=centering)
        assert encoder.cell_centre == (0.5 if centering == "receptive" else stride / 2)
        torch.testing.assert_close(encoder.pool(features, point), torch.full((1, 1, 2048), float(expected)))


def test_key_features_without_a_group_is_the_plain_forward():
    encoder = small_encoder().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = encoder.features(x)
    assert torch.equal(model.key_features(encoder, x, torch.Generator().manual_seed(0)), expected)
    assert torch.equal(model.key_features(encoder, x, None, shuffle=False), expected)


def test_backbone_export_loads_strict_into_torchvision_and_gives_the_same_features():
    encoder = small_encoder()
    perturb_(encoder.backbone, seed=5)
    exported, _ = export.backbone_weights(encoder.state_dict())
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    resnet.load_state_dict(exported, strict=True)
    x = torch.randn(2, 3, 32, 32)
    encoder.eval(), resnet.eval()
    with torch.no_grad():
        torch.testing.assert_close(resnet(x), encoder.trunk(x).mean((2, 3)))


def test_dilated_resnet50_is_stride_16_with_torchvision_weights():
    torch.manual_seed(0)
    encoder = model.Encoder("resnet50", dilated=True)  # the defaults: attn MPH 512 wide, head 2048-2048-128
    assert (encoder.stride, encoder.channels) == (16, 2048)
    with torch.device("meta"):  # shapes only: skip the weight initialisation
        reference = torchvision.models.resnet50().state_dict()
    reference = {name: t.shape for name, t in reference.items() if not name.startswith("fc.")}
    assert {name: t.shape for name, t in export.backbone_weights(encoder.state_dict())[0].items()} == reference
    x = torch.randn(1, 3, 64, 64)
    assert encoder.features(x).shape == (1, 2048, 4, 4)
    assert encoder(x, torch.tensor([[[8.0, 8.0, 40.0, 48.0]]])).shape == (1, 1, 128)


def test_bad_arguments_raise_value_errors_naming_them():
    for kwargs, name in (({"arch": "vgg16"}, "arch"), ({"mph": "mlp"}, "mph"), ({"mph_heads": 5}, "mph_width"),
                         ({"dilated": True}, "dilated"), ({"head_dim": 0}, "head_dim"),
                         ({"roi_centering": "centre"}, "roi_centering")):
        with pytest.raises(ValueError, match=name):
            small_encoder(**kwargs)
    with pytest.raises(ValueError, match="x must be"):
        small_encoder().features(torch.randn(2, 64, 64))


def test_param_groups_decay_only_matrices():
    encoder = small_encoder(mph="attn")
    decay, no_decay = model.param_groups(encoder, weight_decay=1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    grouped = {id(p) for p in decay["params"] + no_decay["params"]}
    assert grouped == {id(p) for p in encoder.parameters()} and len(grouped) == len(list(encoder.parameters()))
    assert model.param_groups(model.build_key_encoder(encoder), 1e-4)[0]["params"] == []  # frozen: skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_step_and_ema():
    """The trainer's precision path: bf16 autocast, channels_last, shuffle-BN helper with a device generator."""
    device = torch.device("cuda")
    encoder_q = small_encoder().to(device, memory_format=torch.channels_last)
    perturb_(encoder_q, seed=6)
    encoder_k = model.build_key_encoder(encoder_q)
    x = torch.randn(4, 3, 96, 96, device=device).to(memory_format=torch.channels_last)
    boxes = random_boxes(4, 5, 96, torch.Generator().manual_seed(7)).to(device)
    with torch.autocast("cuda", torch.bfloat16):
        q = encoder_q(x, boxes[:, :1])  # [4, 1, 32]
        features_k = model.key_features(encoder_k, x, torch.Generator(device).manual_seed(0))
        k = encoder_k.embed(features_k, boxes)  # [4, 5, 32]
    assert q.dtype == k.dtype == torch.float32 and features_k.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(q, k[:, :1], rtol=0.05, atol=0.05)  # same weights, same view: bf16 rounding only
    (q * k[:, :1]).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder_q.parameters())
    model.momentum_update(encoder_k, encoder_q, 0.5)
    model.momentum_update(encoder_k, encoder_q, 0.0)
    for (name, t_k), t_q in zip(encoder_k.state_dict().items(), encoder_q.state_dict().values()):
        assert torch.equal(t_k, t_q), name


def test_the_pytorch_init_is_nn_conv2d_s_own_and_the_run_and_its_random_baseline_share_it():
    # init=pytorch: every conv of the trunk as a freshly built nn.Conv2d draws it (kaiming_uniform, a=sqrt(5):
    # bound 1/sqrt(fan_in)); torchvision's kaiming_normal (fan_out) is wider. The shapes do not change, and
    # the random-init baseline (export.random_backbone) draws the same weights as the run's encoder.
    from maskco import build, config, trunk

    torch.manual_seed(0)
    default = trunk.resnet("resnet18", "cifar", 0.25, init="pytorch")
    torch.manual_seed(0)
    wide = trunk.resnet("resnet18", "cifar", 0.25)
    convs = [(name, m) for name, m in default.named_modules() if isinstance(m, nn.Conv2d)]
    for name, conv in convs:
        bound = 1 / math.sqrt(conv.weight[0].numel())
        assert conv.weight.abs().max() <= bound + 1e-7, name
        assert conv.weight.std() > bound / 2, name  # drawn, not zeroed: uniform(-b, b) has std b / sqrt(3)
    assert any(dict(wide.named_modules())[name].weight.abs().max() > 1 / math.sqrt(conv.weight[0].numel())
               for name, conv in convs)
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in wide.state_dict().items()}
    cfg = config.build_config(["--arch=resnet18", "--stem=cifar", "--width=0.25", "--init=pytorch", "--mph=none"])
    torch.manual_seed(3)
    encoder = build.encoder_of(cfg)
    torch.manual_seed(3)
    baseline = export.random_backbone("resnet18", "cifar", 0.25, "pytorch")
    for key, value in baseline.state_dict().items():
        assert torch.equal(encoder.backbone.state_dict()[key], value), key
    with pytest.raises(ValueError, match="init must be one of"):
        trunk.resnet("resnet18", init="xavier")
