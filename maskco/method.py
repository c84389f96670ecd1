"""One MaskCo (or MoCo v2) step, from a :class:`pipelines.Batch` to the loss.

    Batch --boxes.sample_boxes--> masked box (query view), key boxes (key view)
          --augment.prepare_views--> photometric aug, mask the query box, normalise
          --encoders--> q [N, D] (masked region of the query view), k [N, 1+M, D] (key boxes)
          --loss.contrastive_loss--> InfoNCE

The trainer and the bench both call :func:`ready_inputs` and :func:`forward_loss`; the only place
that reads the Config is :meth:`MethodSpec.from_config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from maskco import augment, boxes, loss
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


def ready_inputs(batch, spec: MethodSpec, generator: Optional[torch.Generator]) -> Inputs:
    """Boxes, photometric augmentation, masking and normalisation, batched on the batch's device.

    Always fp32, even when called under autocast: the augmentation (the blur is a conv2d, which autocast
    would run in bf16, ~1 uint8 level off) must not depend on the precision flag; only the encoders do.
    """
    with torch.autocast(batch.view_q.device.type, enabled=False):
        return _ready_inputs(batch, spec, generator)


def _ready_inputs(batch, spec: MethodSpec, generator: Optional[torch.Generator]) -> Inputs:
    n = batch.view_q.shape[0]
    photometric = dict(jitter=spec.jitter, jitter_prob=spec.jitter_prob, gray_prob=spec.gray_prob,
                       blur_prob=spec.blur_prob, blur_sigma=spec.blur_sigma)
    if spec.method == "mocov2":  # the baseline: no box, nothing masked, whole-view keys
        nothing = torch.zeros(n, 4, device=batch.view_q.device)
        x_q, x_k = augment.prepare_views(batch.view_q, batch.view_k, nothing, generator, mask_mode="none",
                                         channels_last=spec.channels_last, **photometric)
        return Inputs(x_q, x_k, None, None, torch.ones(n, dtype=torch.bool, device=x_q.device))
    sample = boxes.sample_boxes(
        batch.crop_q, batch.crop_k, spec.image_size, spec.num_negatives, generator,
        area=spec.box_area, aspect=spec.box_aspect, min_size=spec.box_min_size,
        min_overlap=spec.min_overlap, negative_max_iou=spec.negative_max_iou,
        check_values=False,  # the loader produced these crops; a check would be a host sync per step
    )
    x_q, x_k = augment.prepare_views(batch.view_q, batch.view_k, sample.masked, generator,
                                     mask_mode=spec.mask_mode, channels_last=spec.channels_last, **photometric)
    return Inputs(x_q, x_k, sample.masked[:, None], sample.keys, sample.valid)


def forward_loss(encoder_q, encoder_k, inputs: Inputs, spec: MethodSpec,
                 shuffle_generator: Optional[torch.Generator], queue=None):
    """-> (loss scalar, stats dict of 0-d tensors, positive keys [N, D] for a queue).

    Reading the stats is a host sync, so the loop does it only on log steps.

    encoder_q may be DDP-wrapped; encoder_k is the momentum copy, outside DDP (never re-broadcast).
    """
    q = encoder_q(inputs.x_q, inputs.boxes_q)[:, 0]  # [N, D] the masked region (or the whole view)
    with torch.no_grad():
        features_k = key_features(encoder_k, inputs.x_k, shuffle_generator, shuffle=spec.shuffle_bn)
        k = encoder_k.embed(features_k, inputs.boxes_k)  # [N, 1+M, D]
    logits = step_logits(q, k, inputs.valid, spec, queue)  # [N, 1 + K] fp32
    stats = {"valid_frac": inputs.valid.float().mean(), "pos_acc": loss.positive_accuracy(logits, inputs.valid)}
    return loss.info_nce(logits, inputs.valid), stats, k[:, 0]


def step_logits(q, k, valid, spec: MethodSpec, queue=None) -> torch.Tensor:
    """The negatives a step uses -> fp32 logits ``[N, 1 + K]``, positive first.

    q ``[N, D]``, k ``[N, 1+M, D]`` (M = 0 for mocov2: global pooling gives one key per image). MaskCo:
    the other images' M negative boxes (+ the image's own with ``intra_negatives``). MoCo v2: the queue
    alone, as ``moco/builder.py`` (``l_neg = q @ queue``); in-batch keys join either method only with
    ``other_positives``.
    """
    extra = queue.negatives() if queue is not None else None  # [K, D] or None
    return loss.contrastive_logits(q, k, valid, spec.temperature, intra=spec.intra_negatives,
                                   other_positives=spec.other_positives, extra_negatives=extra)
