"""The MaskCo network (DESIGN 4.4): ResNet trunk, Mask Prediction Head (MPH), projection head, EMA key copy.

Paper symbols: ``net_q`` = ``Encoder.backbone`` + ``Encoder.mph``, ``head_q`` = ``Encoder.head``; ``net_k`` /
``head_k`` are the same modules of ``build_key_encoder(encoder_q)``, updated by ``momentum_update`` as
``p_k = m p_k + (1 - m) p_q``. A step reads::

    q = encoder_q(x_q, masked[:, None])                               # [N, 1, D]
    k = encoder_k.embed(key_features(encoder_k, x_k, gen), boxes_k)   # [N, 1+M, D], no grad

``backbone`` stays a plain torchvision ResNet (``fc = nn.Identity()``), so its ``backbone.*`` entries are what
transfers (``maskco.export.backbone_weights``); the MPH and the head are dropped at transfer time.
"""
import copy
import math

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import Bottleneck

from maskco import dist, roi, vocab

ARCHS = tuple(name for name in torchvision.models.resnet.__all__ if name[0].islower())  # resnet18 ... wide_resnet101_2
MPH_KINDS, ROI_CENTERINGS, STEMS = vocab.MPH_KINDS, vocab.ROI_CENTERINGS, vocab.STEMS


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


def resnet(arch: str = "resnet50", stem: str = "imagenet", width: float = 1.0, dilated: bool = False) -> nn.Module:
    """A randomly initialised torchvision ResNet with ``fc = nn.Identity()`` (the pooled C5 is its output).

    ``stem="cifar"``: a 3x3 stride-1 conv1 and no max-pool (MoCo's CIFAR demo, solo-learn, lightly), for
    32-64 px images: C5 at stride 8 (4 when ``dilated``) instead of 32. ``width``: a multiplier on every
    stage's channels (0.25: 16-32-64-128 for ResNet-18). With the defaults this is exactly
    ``torchvision.models.<arch>()``, same keys and shapes, so its weights load into torchvision.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
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


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken per contiguous group of ``N / groups`` samples: one
    process's batch normalised as ``groups`` GPUs would normalise it (virtual GPUs, DESIGN 4.4).

    Samples ``[g * N/G, (g + 1) * N/G)`` form group g (the same convention as the loss's negatives and the
    shuffle). The running statistics stay ``[C]``: each step moves them by the mean over groups of the
    group statistics (unbiased variance), the mean of what G ranks' BatchNorms would each record (MoCo's
    SplitBatchNorm does the same); evaluation uses them as plain BatchNorm does. ``groups=1`` is plain
    BatchNorm2d.

    How: one native BatchNorm call per group on its slice of the batch (a slice along N is contiguous in
    NCHW and in channels_last alike, so nothing is copied on the way in), each updating its own row of a
    ``[G, C]`` copy of the running statistics, and one ``cat`` out (it keeps channels_last). Measured on
    CPU, one thread, ResNet-18 x 0.25 at 32 px, batch 256, channels_last, forward + backward of the largest
    layer: 22 ms, against 79 ms for copying the batch to ``[N/G, G*C, H, W]`` for a single call (the
    previous way) and 28 ms for plain BatchNorm over the whole batch.
    """

    def __init__(self, num_features: int, groups: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1 or not self.training:
            return super().forward(x)
        n, c = x.shape[:2]  # x: [N, C, H, W]
        g = self.groups
        if n % g:
            raise ValueError(f"a batch of {n} does not split into {g} virtual GPUs")
        track = self.track_running_stats
        momentum = self._momentum() if track else 0.0
        # [G, C] each: group i's BatchNorm moves row i, as its own rank's BatchNorm would
        running = (self.running_mean.repeat(g).view(g, c), self.running_var.repeat(g).view(g, c)) if track else None
        parts = [F.batch_norm(part, running[0][i] if track else None, running[1][i] if track else None,
                              self.weight, self.bias, True, momentum, self.eps)
                 for i, part in enumerate(x.split(n // g))]  # G x [N/G, C, H, W]
        if track:  # keep the mean of the groups' running statistics
            with torch.no_grad():
                self.running_mean.copy_(running[0].mean(0))
                self.running_var.copy_(running[1].mean(0))
        return torch.cat(parts)  # [N, C, H, W], in the input's memory format

    def _momentum(self) -> float:
        self.num_batches_tracked.add_(1)
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)


def set_virtual_gpus(module: nn.Module, groups: int) -> nn.Module:
    """Every BatchNorm2d of ``module`` normalises per group of ``N / groups`` samples (in place; -> ``module``).

    Plain BatchNorm2d layers become :class:`GroupBatchNorm2d` holding the same parameters and buffers
    (state dict keys and shapes unchanged); existing ones get the new group count. SyncBatchNorm is left as
    it is (its statistics span every rank).
    """
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, GroupBatchNorm2d):
                child.groups = groups
            elif type(child) is nn.BatchNorm2d:
                grouped = GroupBatchNorm2d(child.num_features, groups, eps=child.eps, momentum=child.momentum,
                                           affine=child.affine, track_running_stats=child.track_running_stats)
                grouped.load_state_dict(child.state_dict())
                grouped.train(child.training)
                setattr(parent, name, grouped.to(next(child.buffers(), torch.empty(0)).device))
    return module


def cell_centre(stride: int, centering: str) -> float:
    """Where feature cell 0 looks, in continuous view pixels (pixel p spans [p, p + 1)); cell j: ``stride * j`` more.

    ``receptive`` (0.5, the centre of pixel 0): every stride-2 layer of a torchvision ResNet (7x7 conv pad 3,
    3x3 max-pool pad 1, 3x3 conv pad 1, 1x1 downsample) centres output i on input 2i, so C5 cell j's receptive
    field is centred on pixel ``stride * j``; dilation keeps this (tests/test_alignment.py measures it).
    ``half_pixel`` (``stride / 2``): torchvision's ``roi_align(aligned=True)`` reading, cell j centred at
    ``stride * (j + 0.5)``; with a ResNet it pools ``stride / 2 - 0.5`` px up-left of every box, which a flip
    turns the other way in the source image. Kept for ablation.
    """
    if centering not in ROI_CENTERINGS:
        raise ValueError(f"roi_centering must be one of {ROI_CENTERINGS}, got {centering!r}")
    return 0.5 if centering == "receptive" else stride / 2


def feature_boxes(boxes: torch.Tensor, stride: int, centre: float) -> torch.Tensor:
    """View-pixel boxes ``[N, L, 4]`` -> the boxes to hand ``roi_align(aligned=True, 1 / stride)``, ``[N, L, 4]``.

    ``aligned=True`` samples feature coordinate ``x / stride - 0.5``; shifting x and y by ``stride / 2 - centre``
    makes that ``(x - centre) / stride``, so the RoI's samples sit on the cells whose receptive fields are centred
    on the box (``centre`` from :func:`cell_centre`).
    """
    shift = stride / 2 - centre
    return boxes + shift if shift else boxes  # [N, L, 4]


def region_means(features: torch.Tensor, boxes: torch.Tensor, stride: int, centre: float, sampling_ratio: int,
                 output_size: int, fused: bool = True) -> torch.Tensor:
    """``[N, C, H, W]`` + boxes ``[N, L, 4]`` (view pixels) -> RoI-align means ``[N, L, C]``: what ``Encoder.pool``
    hands the head, also read by the region probe (``maskco.evaluate.region``) so both map boxes alike."""
    pool = roi.roi_pool if fused else roi.roi_pool_reference
    # shapes are still checked; the value checks would read the boxes on the host (a sync per step)
    return pool(features, feature_boxes(boxes, stride, centre), 1.0 / stride, sampling_ratio, aligned=True,
                output_size=output_size, validate_boxes=False)  # [N, L, C]


def sine_position_embedding(height: int, width: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """DETR's 2D sine positions (normalize=True, scale 2*pi) -> ``[H*W, dim]``, row-major like ``flatten(2)``.

    The first ``dim / 2`` channels encode y, the rest x; each half interleaves sin and cos over geometric
    frequencies. Normalising the coordinates to (0, 2*pi] makes a 4x4 map (96-128 px) and a 14x14 map
    (dilated, 224 px) span the same phase range, so the MPH sees comparable positions at every size.
    https://github.com/facebookresearch/detr/blob/main/models/position_encoding.py
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be divisible by 4 for 2D sine positions, got {dim}")
    half = dim // 2
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + 1e-6) * 2 * math.pi  # [H]
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + 1e-6) * 2 * math.pi  # [W]
    freq = 10000.0 ** (2 * (torch.arange(half, device=device) // 2) / half)  # [half]
    pos_y = y[:, None] / freq  # [H, half]
    pos_x = x[:, None] / freq  # [W, half]
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # [H, half]
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # [W, half]
    pos = torch.cat((pos_y[:, None].expand(-1, width, -1), pos_x[None].expand(height, -1, -1)), dim=2)  # [H, W, dim]
    return pos.flatten(0, 1).to(dtype)  # [H*W, dim]


class AttentionMPH(nn.Module):
    """Residual Transformer MPH: ``x + expand(encoder(reduce(x) + pos))`` on the C5 tokens.

    Pre-norm layers (``norm_first=True``) plus a final LayerNorm: pre-norm keeps an identity path through
    every layer, so it trains with SGD at MoCo's learning rate without the learning-rate warm-up that
    post-norm Transformers need, and it matches ViT/MAE. Positions are added once to the input tokens
    (ViT-style) rather than to q/k of every layer (DETR), which lets us use ``nn.TransformerEncoderLayer``
    and its fused attention. No dropout (self-supervised pretraining, as MoCo). ``expand`` is
    zero-initialised, so at initialisation the MPH is exactly the identity and the trunk starts as MoCo's.
    """

    def __init__(self, channels: int, width: int, layers: int, heads: int):
        super().__init__()
        if width % heads != 0 or width % 4 != 0:
            raise ValueError(f"mph_width ({width}) must be divisible by mph_heads ({heads}) and by 4")
        self.reduce = nn.Conv2d(channels, width, 1)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.expand = nn.Conv2d(width, channels, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape  # x: [N, C, H, W]
        t = self.reduce(x).flatten(2).transpose(1, 2)  # [N, H*W, D]; a free view when x is channels_last
        t = t + sine_position_embedding(h, w, t.shape[-1], t.device, t.dtype)  # [N, H*W, D]
        t = self.encoder(t)  # [N, H*W, D]
        return x + self.expand(t.transpose(1, 2).reshape(n, -1, h, w))  # [N, C, H, W]


def conv_mph(channels: int) -> nn.Sequential:
    """Two torchvision Bottleneck blocks at C5 width; the last BN of each starts at gamma 0 (identity at init)."""
    blocks = [Bottleneck(channels, channels // Bottleneck.expansion) for _ in range(2)]
    for block in blocks:
        nn.init.zeros_(block.bn3.weight)
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    """ResNet trunk -> MPH -> RoI average pool -> projection head; one of the two MaskCo branches.

    ``features(x)``: ``[N, 3, S, S]`` -> ``[N, C, S/stride, S/stride]`` (C5 after the MPH).
    ``embed(features, boxes)``: boxes ``[N, L, 4]`` xyxy in view pixels -> ``[N, L, head_dim]`` unit vectors;
    ``boxes=None`` global-average-pools instead (L = 1): the ``mocov2`` baseline on the same network.
    ``dilated`` turns layer4's stride into dilation (stride 16); the weights keep torchvision's shapes.
    ``stem`` / ``width``: the small-image stem and a channel multiplier (:func:`resnet`); ``stride`` is
    measured on the built trunk (:func:`trunk_stride`), so boxes map to C5 correctly for every variant.
    ``roi_fused`` picks ``roi.roi_pool`` (separable matmul, DESIGN 4.5) over the torchvision reference.
    ``roi_centering`` sets ``cell_centre``, where cell 0 looks in view pixels (see :func:`cell_centre`):
    ``receptive`` centres each RoI on its box through the trunk; ``half_pixel`` is the old mapping (ablation).
    """

    def __init__(self, arch: str = "resnet50", dilated: bool = False, mph: str = "attn", mph_width: int = 512,
                 mph_layers: int = 2, mph_heads: int = 8, head_hidden: int = 2048, head_dim: int = 128,
                 roi_output_size: int = 7, roi_sampling_ratio: int = 2, roi_fused: bool = True,
                 roi_centering: str = "receptive", stem: str = "imagenet", width: float = 1.0):
        super().__init__()
        if mph not in MPH_KINDS:
            raise ValueError(f"mph must be one of {MPH_KINDS}, got {mph!r}")
        for name, value in (("mph_layers", mph_layers), ("mph_heads", mph_heads), ("head_hidden", head_hidden),
                            ("head_dim", head_dim), ("roi_output_size", roi_output_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.backbone = resnet(arch, stem, width, dilated)
        self.stride = trunk_stride(self.backbone)  # 32, 16 dilated; 8 / 4 with the small-image stem
        self.cell_centre = cell_centre(self.stride, roi_centering)  # also validates roi_centering
        self.channels = c5_channels(self.backbone)  # 512 (resnet18/34), 2048 (resnet50); x width
        if mph == "attn":
            self.mph = AttentionMPH(self.channels, mph_width, mph_layers, mph_heads)
        elif mph == "conv":
            self.mph = conv_mph(self.channels)
        else:
            self.mph = nn.Identity()
        self.head = nn.Sequential(nn.Linear(self.channels, head_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(head_hidden, head_dim))
        self.roi_output_size = roi_output_size
        self.roi_sampling_ratio = roi_sampling_ratio
        self.roi_fused = roi_fused
        self.roi_centering = roi_centering  # read once, into cell_centre above

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(self.features(x), boxes)  # [N, L, head_dim]

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """ResNet up to layer4: ``[N, 3, S, S]`` -> C5 ``[N, C, S/stride, S/stride]``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be [N, 3, H, W], got {tuple(x.shape)}")
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))  # [N, 64, S/4, S/4]
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))  # [N, C, S/stride, S/stride]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk then MPH: ``[N, 3, S, S]`` -> ``[N, C, S/stride, S/stride]``."""
        return self.mph(self.trunk(x))

    def pool(self, features: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, C, H, W]`` (+ boxes ``[N, L, 4]`` view pixels) -> region means ``[N, L, C]``; no boxes: ``L = 1``."""
        if boxes is None:
            return features.mean((2, 3))[:, None]  # [N, 1, C]
        return region_means(features, boxes, self.stride, self.cell_centre, self.roi_sampling_ratio,
                            self.roi_output_size, self.roi_fused)  # [N, L, C]

    def embed(self, features: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, C, H, W]`` (+ boxes ``[N, L, 4]`` view pixels) -> ``[N, L, head_dim]`` L2-normalised, fp32."""
        pooled = self.pool(features, boxes)  # [N, L, C]
        # normalise in fp32: the logits are fp32 (DESIGN 4.6) and bf16 unit vectors would cost ~3 digits
        return F.normalize(self.head(pooled).float(), dim=-1)  # [N, L, head_dim]


def build_key_encoder(encoder_q: nn.Module) -> nn.Module:
    """The momentum copy: same weights, no gradients anywhere (keys are detached, DESIGN 4.4)."""
    encoder_k = copy.deepcopy(unwrap(encoder_q))
    encoder_k.requires_grad_(False)
    return encoder_k


@torch.no_grad()
def key_features(encoder_k: nn.Module, x_k: torch.Tensor, generator: torch.Generator | None,
                 shuffle: bool = True, permutation: torch.Tensor | None = None) -> torch.Tensor:
    """Key-branch feature map with shuffle-BN: ``[N, 3, S, S]`` -> ``[N, C, h, w]`` in the original order.

    The map is un-shuffled before RoI pooling because the key boxes refer to this rank's original order.
    With one process (or ``shuffle=False``, e.g. for SyncBN) this is plain ``encoder_k.features(x_k)``.
    ``permutation``: the shuffle drawn beforehand (``dist.draw_shuffle``), instead of drawing it from
    ``generator`` here.
    """
    if not shuffle:
        return encoder_k.features(x_k)
    if permutation is None:
        permutation = dist.draw_shuffle(x_k.shape[0], generator, x_k.device)
    x_k, idx_unshuffle = dist.shuffle_batch_by(x_k, permutation)  # [N, 3, S, S], other ranks' images
    return dist.unshuffle_batch(encoder_k.features(x_k), idx_unshuffle)  # [N, C, h, w]


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while isinstance(module, nn.parallel.DistributedDataParallel) or hasattr(module, "_orig_mod"):
        module = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module._orig_mod
    return module


def _named(module: nn.Module, kind: str) -> list:
    """``[(owner dict, name, tensor)]`` for every parameter or buffer, in ``named_*`` order."""
    return [(m.__dict__["_" + kind], name, t) for m in module.modules()
            for name, t in m.__dict__["_" + kind].items() if t is not None]


class KeyEncoderEMA:
    """The momentum update of the key encoder, ``p_k = m p_k + (1 - m) p_q`` for every parameter (trunk,
    MPH, head), in one fused foreach call; it holds the tensor lists so a step costs two or three launches.

    Buffers (BN running statistics) are copied from the query encoder instead of averaged: the key encoder
    always runs in train mode (batch statistics, shuffle-BN), so its running stats are only ever read if
    someone evaluates or exports ``encoder_k``, and then the query's statistics (measured on unmasked and
    masked views with the live weights) are the coherent choice; averaging ``num_batches_tracked`` would
    make no sense. The lists are rebuilt when ``.to()`` / ``.cuda()`` replaced the tensors (checked on
    one tensor of each list per call). ``encoder_q`` may be DDP- or ``torch.compile``-wrapped.
    """

    def __init__(self, encoder_k: nn.Module, encoder_q: nn.Module):
        self.encoder_k, self.encoder_q = unwrap(encoder_k), unwrap(encoder_q)
        self._lists = self._build()

    @torch.no_grad()
    def __call__(self, momentum: float) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if not all(owner.get(name) is t for owner, name, t in self._probes):
            self._lists = self._build()
        params_k, params_q, buffers_k, buffers_q = self._lists
        torch._foreach_lerp_(params_k, params_q, 1.0 - momentum)
        for group_k, group_q in zip(buffers_k, buffers_q):
            torch._foreach_copy_(group_k, group_q)

    def _build(self) -> tuple[list, list, list, list]:
        params_k, params_q = _named(self.encoder_k, "parameters"), _named(self.encoder_q, "parameters")
        buffers_k, buffers_q = _named(self.encoder_k, "buffers"), _named(self.encoder_q, "buffers")
        shapes = lambda entries: [(name, t.shape, t.dtype) for _, name, t in entries]  # noqa: E731
        if shapes(params_k) != shapes(params_q) or shapes(buffers_k) != shapes(buffers_q):
            raise ValueError("encoder_k and encoder_q must have the same parameters and buffers "
                             "(use build_key_encoder)")
        groups: dict = {}  # one buffer list per dtype, so every foreach call takes its fast path
        for (_, _, b_k), (_, _, b_q) in zip(buffers_k, buffers_q):
            groups.setdefault(b_k.dtype, ([], []))[0].append(b_k)
            groups[b_k.dtype][1].append(b_q)
        # (dict, name, tensor): tells when .to()/.cuda() replaced the listed tensors
        self._probes = [entries[0] for entries in (params_k, params_q, buffers_k, buffers_q) if entries]
        return ([t for *_, t in params_k], [t for *_, t in params_q],
                [g[0] for g in groups.values()], [g[1] for g in groups.values()])


def momentum_update(encoder_k: nn.Module, encoder_q: nn.Module, momentum: float) -> None:
    """One EMA update (see :class:`KeyEncoderEMA`; a loop keeps one of those instead of calling this)."""
    KeyEncoderEMA(encoder_k, encoder_q)(momentum)


def param_groups(module: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Two optimizer groups: ``weight_decay`` on >= 2-D weights (conv, linear, attention), none on 1-D
    parameters (BN and LayerNorm affine, biases), the usual practice (DESIGN 4.7); ``decay_all`` decays the
    1-D parameters too, as MoCo v2 does (``moco/main_moco.py`` hands SGD every parameter). Frozen params
    are skipped."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": weight_decay if decay_all else 0.0}]
