"""Every config key's rule (DESIGN 2.4): ``RULES[key] = (predicate on the parsed value, what it must be)``.

``maskco.config`` checks every Config against this table after parsing (the types and the choice lists are
checked while parsing); the rules that tie keys together stay there, beside the check.
"""
from __future__ import annotations

import math


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _at_least(low):
    return lambda value: _finite(value) and value >= low


def _above(low):
    return lambda value: _finite(value) and value > low


def _within(low, high):
    return lambda value: _finite(value) and low <= value <= high


def _range_of(check):
    """(low, high) with both values passing ``check`` and low <= high."""
    return lambda pair: all(check(v) for v in pair) and pair[0] <= pair[1]


def _any(value) -> bool:
    return True


_PROBABILITY = (_within(0.0, 1.0), "must be a probability in [0, 1]")
_FLAG = (_any, "")  # a bool: its type is the whole rule (checked when it is parsed)
_CHOICE = (_any, "")  # one of config.CHOICES[key] (checked when it is parsed)
_TEXT = (lambda value: value != "", "must not be empty")
_FREE_TEXT = (_any, "")  # a path that may be empty ("": not used)

# Every key's rule, in one reviewed place: (predicate on the parsed value, what it must be). Every
# number is finite (nan and inf are refused: a NaN learning rate trains garbage until the loss shows
# it). tests/test_train.py checks that every Config key has a rule; a new key needs one here.
RULES: dict[str, tuple] = {
    # method
    "method": _CHOICE,
    "arch": (lambda v: v.startswith("resnet"), "must be a torchvision resnet (resnet18, resnet50, ...)"),
    "dilated": _FLAG, "stem": _CHOICE, "init": _CHOICE,
    "width": (_above(0), "must be > 0 (a multiplier on every stage's channels)"),
    "mph": _CHOICE, "mph_width": (_at_least(4), "must be >= 4"),
    "mph_layers": (_at_least(1), "must be >= 1"), "mph_heads": (_at_least(1), "must be >= 1"),
    "head_hidden": (_at_least(1), "must be >= 1"), "head_dim": (_at_least(1), "must be >= 1"),
    "roi_output_size": (_at_least(1), "must be >= 1"),
    "roi_sampling_ratio": (_finite, "must be an integer (<= 0: adaptive)"),
    "roi_fused": _FLAG, "roi_centering": _CHOICE, "num_negatives": (_at_least(0), "must be >= 0"),
    "intra_negatives": _FLAG, "other_positives": _FLAG, "queue_size": (_at_least(0), "must be >= 0 (0: off)"),
    "temperature": (_above(0), "must be > 0"), "momentum": (_within(0.0, 1.0), "must be in [0, 1]"),
    "momentum_schedule": _CHOICE, "key_bn": _CHOICE,
    "virtual_gpus": (_at_least(1), "must be >= 1 (GPUs each process stands in for)"),
    # boxes
    "box_area": (_range_of(_within(0.0, 1.0)), "must be (min, max) fractions of the view's area in [0, 1]"),
    "box_aspect": (_range_of(_above(0)), "must be (min, max) > 0"),
    "box_min_size": (_at_least(0), "must be >= 0 (pixels)"), "min_overlap": (_within(0.0, 1.0), "must be in [0, 1]"),
    "negative_max_iou": (_within(0.0, 1.0), "must be in [0, 1]"), "mask_mode": _CHOICE,
    # views
    "image_size": (_at_least(32), "must be >= 32"),
    "crop_scale": (_range_of(lambda v: _finite(v) and 0 < v <= 1), "must be (min, max) area fractions in (0, 1]"),
    "crop_ratio": (_range_of(_above(0)), "must be (min, max) aspect ratios > 0"),
    "flip_prob": _PROBABILITY,
    "jitter": (lambda v: all(_at_least(0)(x) for x in v) and v[3] <= 0.5,
               "must be brightness, contrast, saturation >= 0 and hue in [0, 0.5]"),
    "jitter_prob": _PROBABILITY, "gray_prob": _PROBABILITY, "blur_prob": _PROBABILITY,
    "blur_sigma": (_range_of(_above(0)), "must be (min, max) > 0 (pixels)"),
    # data
    "data": _TEXT, "sample_images": (_at_least(1), "must be >= 1"), "sample_dir": _TEXT, "backend": _CHOICE,
    "workers": (_at_least(-1), "must be >= 0, or -1 for the backend's default"), "strict_data": _FLAG,
    # optimisation
    "batch_size": (_at_least(2), "must be >= 2 (negatives come from other images)"),
    "epochs": (_at_least(1), "must be >= 1"), "max_steps": (_at_least(0), "must be >= 0 (0: all epochs)"),
    "base_lr": (_above(0), "must be finite and > 0 (a negative lr climbs the loss)"),
    "min_lr": (_at_least(0), "must be >= 0"), "warmup_epochs": (_at_least(0), "must be >= 0"),
    "weight_decay": (_at_least(0), "must be >= 0"), "weight_decay_all": _FLAG,
    "sgd_momentum": (lambda v: _finite(v) and 0 <= v < 1, "must be in [0, 1)"),
    # speed
    "device": _CHOICE, "precision": _CHOICE, "channels_last": _FLAG, "compile": _FLAG, "compile_mode": _CHOICE,
    "compile_backend": _TEXT, "prefetch": _CHOICE,
    # run
    "seed": (_at_least(0), "must be >= 0"), "out_dir": _TEXT,
    "resume": (lambda v: v != "", "must be auto, none or a checkpoint path"),
    "log_every": (_at_least(1), "must be >= 1"), "ckpt_every": (_at_least(0), "must be >= 0 (0: at epoch ends only)"),
    "keep_checkpoints": (_at_least(1), "must be >= 1"),
    "dist_timeout": (_above(0), "must be > 0 (seconds)"),
    "data_timeout": (_at_least(0), "must be >= 0 (seconds; 0: wait forever)"),
    "tensorboard": _FLAG, "knn_every": (_at_least(0), "must be >= 0 (0: off)"), "knn_train": _FREE_TEXT,
    "knn_val": _FREE_TEXT, "export": _FLAG,
}
