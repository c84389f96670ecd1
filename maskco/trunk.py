"""The ResNet trunk (DESIGN 4.4): a torchvision ResNet with the small-image stem and a width multiplier,
its C5 stride measured, its C5 width read.

With the defaults ``resnet(arch)`` is exactly ``torchvision.models.<arch>()`` with ``fc = nn.Identity()``, same
keys and shapes, so its weights load into torchvision (``is_torchvision_shaped``); ``maskco.model.Encoder`` holds
it as ``backbone``.
"""
import torch
import torchvision
from torch import nn

from maskco import vocab

ARCHS = vocab.ARCHS  # torchvision's ResNet family, resnet18 ... wide_resnet101_2 (a test checks the list)
STEMS, INITS = vocab.STEMS, vocab.INITS


class _ScaledResNet(torchvision.models.ResNet):
    """A torchvision ResNet with every stage's width (and the stem's) multiplied by ``width``.

    torchvision hard-codes 64-128-256-512 planes; this rebuilds the stem and the four stages with
    ``round(planes * width)`` through torchvision's own ``_make_layer`` (same blocks, same names, so the
    state dict keeps torchvision's keys) and re-applies torchvision's initialisation to them.
    """

    def __init__(self, block, layers, width: float, **kwargs):
        super().__init__(block, layers, **kwargs)
        planes = [max(1, round(p * width)) for p in (64, 128, 256, 512)]
        dilate = kwargs.get("replace_stride_with_dilation") or [False, False, False]
        self.inplanes, self.dilation = planes[0], 1
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(planes[0])
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        for index in range(1, 4):
            setattr(self, f"layer{index + 1}",
                    self._make_layer(block, planes[index], layers[index], stride=2, dilate=dilate[index - 1]))
        self.fc = nn.Linear(planes[3] * block.expansion, self.fc.out_features)
        _torchvision_init(self)


def _torchvision_init(module: nn.Module) -> None:
    """torchvision ResNet's initialisation (``zero_init_residual=False``) of every conv and norm in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def resnet(arch: str = "resnet50", stem: str = "imagenet", width: float = 1.0, dilated: bool = False,
           init: str = "torchvision") -> nn.Module:
    """A randomly initialised torchvision ResNet with ``fc = nn.Identity()`` (the pooled C5 is its output).

    ``stem="cifar"``: a 3x3 stride-1 conv1 and no max-pool (MoCo's CIFAR demo, solo-learn, lightly), for
    32-64 px images: C5 at stride 8 (4 when ``dilated``) instead of 32. ``width``: a multiplier on every
    stage's channels (0.25: 16-32-64-128 for ResNet-18). With the defaults this is exactly
    ``torchvision.models.<arch>()``, same keys and shapes, so its weights load into torchvision.
    ``init="pytorch"``: every conv re-drawn with ``nn.Conv2d``'s own default (kaiming_uniform, a=sqrt(5)), the
    init of a ResNet written from ``nn.Conv2d`` (the shapes do not change; BatchNorm stays 1 / 0).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    dilation = [False, False, dilated]
    try:
        model = getattr(torchvision.models, arch)(weights=None, replace_stride_with_dilation=dilation)
    except NotImplementedError as error:  # torchvision: "Dilation > 1 not supported in BasicBlock"
        raise ValueError(f"dilated=True needs a Bottleneck arch (resnet50 and up), got arch={arch!r}") from error
    if width != 1.0:
        depths = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
        model = _ScaledResNet(type(model.layer1[0]), depths, width, groups=model.groups,
                              width_per_group=model.base_width, replace_stride_with_dilation=dilation)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    if init == "pytorch":
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
    return model


def c5_channels(backbone: nn.Module) -> int:
    """Channels of C5: the last block's output (its last BatchNorm's width)."""
    last = backbone.layer4[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def is_torchvision_shaped(stem: str, width: float) -> bool:
    """Whether a backbone of this stem and width loads into ``torchvision.models.<arch>()`` as it is."""
    return stem == "imagenet" and width == 1.0


@torch.no_grad()
def trunk_stride(backbone: nn.Module, probe: int = 64) -> int:
    """C5's stride in view pixels, measured: a ``probe`` px image through conv1 ... layer4 (eval mode, so
    no running statistic moves); 32 for torchvision's stem, 8 for the small-image stem, half when dilated."""
    was_training = backbone.training
    backbone.eval()
    try:
        weight = backbone.conv1.weight
        x = torch.zeros(1, 3, probe, probe, device=weight.device, dtype=weight.dtype)
        b = backbone
        size = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))))).shape[-1]
    finally:
        backbone.train(was_training)
    return probe // size
