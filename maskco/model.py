"""The MaskCo network (DESIGN 4.4): ResNet trunk, Mask Prediction Head (MPH), projection head, EMA key copy.

The trunk is built in ``maskco.trunk`` and the MPH in ``maskco.mph``; this module assembles them into
:class:`Encoder`, with the grouped BatchNorm of virtual GPUs, the RoI pooling and the key encoder.

Paper symbols: ``net_q`` = ``Encoder.backbone`` + ``Encoder.mph``, ``head_q`` = ``Encoder.head``; ``net_k`` /
``head_k`` are the same modules of ``build_key_encoder(encoder_q)``, updated by ``momentum_update`` as
``p_k = m p_k + (1 - m) p_q``. A step reads::

    q = encoder_q(x_q, masked[:, None])                               # [N, 1, D]
    k = encoder_k.embed(key_features(encoder_k, x_k, gen), boxes_k)   # [N, 1+M, D], no grad

``backbone`` stays a plain torchvision ResNet (``fc = nn.Identity()``), so its ``backbone.*`` entries are what
transfers (``maskco.export.backbone_weights``); the MPH and the head are dropped at transfer time.
"""
import copy

import torch
from torch import nn
from torch.nn import functional as F

from maskco import dist, roi, vocab
from maskco.mph import AttentionMPH, conv_mph
from maskco.trunk import c5_channels, resnet, trunk_stride

MPH_KINDS, ROI_CENTERINGS = vocab.MPH_KINDS, vocab.ROI_CENTERINGS


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


class Encoder(nn.Module):
    """ResNet trunk -> MPH -> RoI average pool -> projection head; one of the two MaskCo branches.

    ``features(x)``: ``[N, 3, S, S]`` -> ``[N, C, S/stride, S/stride]`` (C5 after the MPH).
    ``embed(features, boxes)``: boxes ``[N, L, 4]`` xyxy in view pixels -> ``[N, L, head_dim]`` unit vectors;
    ``boxes=None`` global-average-pools instead (L = 1): the ``mocov2`` baseline on the same network.
    ``dilated`` turns layer4's stride into dilation (stride 16); the weights keep torchvision's shapes.
    ``stem`` / ``width`` / ``init``: the small-image stem, a channel multiplier and the convs' random init
    (``trunk.resnet``); ``stride`` is measured on the built trunk (``trunk.trunk_stride``), so boxes map to
    C5 correctly for every variant.
    ``roi_fused`` picks ``roi.roi_pool`` (separable matmul, DESIGN 4.5) over the torchvision reference.
    ``roi_centering`` sets ``cell_centre``, where cell 0 looks in view pixels (see :func:`cell_centre`):
    ``receptive`` centres each RoI on its box through the trunk; ``half_pixel`` is the old mapping (ablation).
    """

    def __init__(self, arch: str = "resnet50", dilated: bool = False, mph: str = "attn", mph_width: int = 512,
                 mph_layers: int = 2, mph_heads: int = 8, head_hidden: int = 2048, head_dim: int = 128,
                 roi_output_size: int = 7, roi_sampling_ratio: int = 2, roi_fused: bool = True,
                 roi_centering: str = "receptive", stem: str = "imagenet", width: float = 1.0,
                 init: str = "torchvision"):
        super().__init__()
        if mph not in MPH_KINDS:
            raise ValueError(f"mph must be one of {MPH_KINDS}, got {mph!r}")
        for name, value in (("mph_layers", mph_layers), ("mph_heads", mph_heads), ("head_hidden", head_hidden),
                            ("head_dim", head_dim), ("roi_output_size", roi_output_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.backbone = resnet(arch, stem, width, dilated, init)
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
