"""One MaskCo (or MoCo v2) step, from a :class:`pipelines.Batch` to the loss.

    Batch --draw_noise--> every random tensor of the step (Noise)
          --inputs_from_noise--> boxes.boxes_from_uniforms: masked box (query view), key boxes (key view)
                                 augment.views_from_params: photometric aug, mask the query box, normalise
          --loss_from_inputs--> encoders: q [N, D] (masked region of the query view), k [N, 1+M, D] (key boxes)
                                loss.contrastive_logits, loss.info_nce: InfoNCE

The trainer and the bench run it through :class:`maskco.step.Step`: :func:`draw_noise`, then the pure
:func:`inputs_from_noise` and :func:`loss_from_inputs` (eager or compiled). :func:`ready_inputs` is the
convenience wrapper (draw, then :func:`inputs_from_noise`) for ``show`` and localisation. The only
place that reads the Config is :meth:`MethodSpec.from_config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from maskco import augment, boxes, dist, loss
from maskco.model import key_features


@dataclass(frozen=True)
class MethodSpec:
    """Plain values the step needs, taken from a Config by :meth:`from_config` (their meaning and
    defaults live in maskco/config.py only)."""

    method: str
    image_size: int
    num_negatives: int
    box_area: tuple
    box_aspect: tuple
    box_min_size: float
    min_overlap: float
    negative_max_iou: float
    mask_mode: str
    jitter: tuple
    jitter_prob: float
    gray_prob: float
    blur_prob: float
    blur_sigma: tuple
    temperature: float
    intra_negatives: bool
    other_positives: bool
    channels_last: bool
    virtual_gpus: int = 1  # G: BatchNorm groups, the shuffle's span and MaskCo's negatives per N / G images
    shuffle_bn: bool = True  # not a Config key: the trainer derives it from key_bn

    @classmethod
    def from_config(cls, cfg, shuffle_bn: bool = True, **changes) -> "MethodSpec":
        """The step's values from ``cfg`` (and ``changes``, e.g. in tests)."""
        names = [name for name in cls.__dataclass_fields__ if name != "shuffle_bn"]
        return cls(**{**{name: getattr(cfg, name) for name in names}, **changes}, shuffle_bn=shuffle_bn)


class Inputs(NamedTuple):
    """What the encoders consume. boxes_q/boxes_k are None for mocov2 (global pooling)."""

    x_q: torch.Tensor  # [N, 3, S, S] normalised, masked
    x_k: torch.Tensor  # [N, 3, S, S] normalised
    boxes_q: Optional[torch.Tensor]  # [N, 1, 4] the masked box, query-view pixels
    boxes_k: Optional[torch.Tensor]  # [N, 1+M, 4] positive then negatives, key-view pixels
    valid: torch.Tensor  # [N] bool


class Noise(NamedTuple):
    """Every random tensor one step uses (:func:`draw_noise`); the rest of the step is a pure function
    of these and the batch (:func:`inputs_from_noise`, :func:`loss_from_inputs`)."""

    box: Optional[torch.Tensor]  # [N, 4] uniforms of the masked box (boxes.draw_uniforms); None for mocov2
    negatives: Optional[torch.Tensor]  # [N, M, T, 4] uniforms of the negative candidates; None for mocov2
    photometric: augment.PhotometricParams  # 2N rows: the query views' then the key views'
    mask: Optional[torch.Tensor]  # [N, 3, S, S] the noise mask's fill (mask_mode=noise only)
    shuffle: Optional[torch.Tensor]  # [W * N] shuffle-BN's permutation (None: one process, or no shuffle-BN)


def draw_noise(spec: MethodSpec, n: int, device, generator: Optional[torch.Generator],
               shuffle_generator: Optional[torch.Generator] = None, box_dtype=torch.float32) -> Noise:
    """Draw a step's randomness for ``n`` images on ``device``, in this order from ``generator`` (per
    rank): the box uniforms (boxes.draw_uniforms, as boxes.sample_boxes draws them), the photometric
    parameters of 2N views (the query views' rows first), the noise mask's fill; then shuffle-BN's
    permutation from ``shuffle_generator`` (the same on every rank). ``box_dtype``: the crops' dtype
    (the box uniforms are drawn in it)."""
    box = negatives = mask = None
    if spec.method != "mocov2":
        box, negatives = boxes.draw_uniforms(n, spec.num_negatives, spec.negative_max_iou, generator, device,
                                             box_dtype)
    photometric = augment.sample_photometric(2 * n, generator, device, **_photometric(spec))
    if spec.method != "mocov2" and spec.mask_mode == "noise":
        mask = augment.draw_mask_noise((n, 3, spec.image_size, spec.image_size), generator, device)
    shuffle = dist.draw_shuffle(n, shuffle_generator, device, spec.virtual_gpus) if spec.shuffle_bn else None
    return Noise(box, negatives, photometric, mask, shuffle)


def _photometric(spec: MethodSpec) -> dict:
    return dict(jitter=spec.jitter, jitter_prob=spec.jitter_prob, gray_prob=spec.gray_prob,
                blur_prob=spec.blur_prob, blur_sigma=spec.blur_sigma)


def ready_inputs(batch, spec: MethodSpec, generator: Optional[torch.Generator]) -> Inputs:
    """The convenience wrapper of the pair the step runs: :func:`draw_noise` from ``generator``, then
    :func:`inputs_from_noise` (boxes, photometric augmentation, masking and normalisation, batched on the
    batch's device, fp32 always). For callers without a :class:`maskco.step.Step` (show, localisation)."""
    noise = draw_noise(spec, batch.view_q.shape[0], batch.view_q.device, generator, box_dtype=batch.crop_q.dtype)
    return inputs_from_noise(batch, spec, noise)


def inputs_from_noise(batch, spec: MethodSpec, noise: Noise, mean_std: Optional[tuple] = None) -> Inputs:
    """The step's inputs from the batch and its drawn randomness: a pure function of tensors with static
    shapes and no host sync (what the compiled and the graph-captured steps run). ``mean_std``: the
    normalisation constants on the device (augment.normalize_constants), made here if None.

    Always fp32, even when called under autocast: the augmentation (the blur is a conv2d, which autocast
    would run in bf16, ~1 uint8 level off) must not depend on the precision flag; only the encoders do.
    """
    with torch.autocast(batch.view_q.device.type, enabled=False):
        n = batch.view_q.shape[0]
        views = dict(channels_last=spec.channels_last, mean_std=mean_std)
        if spec.method == "mocov2":  # the baseline: no box, nothing masked, whole-view keys
            nothing = torch.zeros(n, 4, device=batch.view_q.device)
            x_q, x_k = augment.views_from_params(batch.view_q, batch.view_k, nothing, noise.photometric, None,
                                                 mask_mode="none", **views)
            return Inputs(x_q, x_k, None, None, torch.ones(n, dtype=torch.bool, device=x_q.device))
        sample = boxes.boxes_from_uniforms(
            batch.crop_q, batch.crop_k, spec.image_size, noise.box.to(batch.crop_q.dtype),
            noise.negatives.to(batch.crop_q.dtype), area=spec.box_area, aspect=spec.box_aspect,
            min_size=spec.box_min_size, min_overlap=spec.min_overlap, negative_max_iou=spec.negative_max_iou)
        x_q, x_k = augment.views_from_params(batch.view_q, batch.view_k, sample.masked, noise.photometric,
                                             noise.mask, mask_mode=spec.mask_mode, **views)
        return Inputs(x_q, x_k, sample.masked[:, None], sample.keys, sample.valid)


def loss_from_inputs(encoder_q, encoder_k, inputs: Inputs, spec: MethodSpec, permutation: Optional[torch.Tensor],
                     extra_negatives: Optional[torch.Tensor] = None):
    """-> (loss scalar, stats dict of 0-d tensors, positive keys [N, D] for a queue): the query
    forward, the key forward (shuffle-BN by ``permutation``, see :func:`draw_noise`), logits, InfoNCE.
    A pure function of tensors (and the encoders' weights); ``extra_negatives``: the queue's keys.

    Reading the stats is a host sync, so the loop does it only on log steps.

    encoder_q may be DDP-wrapped; encoder_k is the momentum copy, outside DDP (never re-broadcast).
    """
    q = encoder_q(inputs.x_q, inputs.boxes_q)[:, 0]  # [N, D] the masked region (or the whole view)
    with torch.no_grad():
        features_k = key_features(encoder_k, inputs.x_k, None, shuffle=permutation is not None,
                                  permutation=permutation)
        k = encoder_k.embed(features_k, inputs.boxes_k)  # [N, 1+M, D]
    logits = step_logits(q, k, inputs.valid, spec, extra_negatives)  # [N, 1 + K] fp32
    groups = spec.virtual_gpus
    stats = {"valid_frac": inputs.valid.float().mean(),
             "pos_acc": loss.positive_accuracy(logits, inputs.valid, groups)}
    return loss.info_nce(logits, inputs.valid, groups), stats, k[:, 0]


def step_logits(q, k, valid, spec: MethodSpec, extra_negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The negatives a step uses -> fp32 logits ``[N, 1 + K]``, positive first.

    q ``[N, D]``, k ``[N, 1+M, D]`` (M = 0 for mocov2: global pooling gives one key per image). MaskCo:
    the other images' M negative boxes (+ the image's own with ``intra_negatives``), other images of the
    query's own virtual GPU only, as the paper's 496 come from the same GPU. MoCo v2: the queue
    (``extra_negatives``, ``KeyQueue.negatives()``) alone, as ``moco/builder.py`` (``l_neg = q @ queue``);
    in-batch keys join either method only with ``other_positives``.
    """
    return loss.contrastive_logits(q, k, valid, spec.temperature, intra=spec.intra_negatives,
                                   other_positives=spec.other_positives, extra_negatives=extra_negatives,
                                   groups=spec.virtual_gpus)
