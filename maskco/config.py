"""The run configuration: one frozen dataclass, YAML presets, ``--key=value`` overrides.

Presets (``maskco/configs/*.yaml``) list only what differs from the defaults below; later presets and
then overrides win. An unknown key or a badly typed value is a :class:`ConfigError` naming the valid
keys; then every value is checked against its rule (``maskco.config_rules.RULES``). The config is never
mutated after parsing; derived values (global batch, peak LR) come from the named functions at the bottom
and are logged once.
"""
from __future__ import annotations

import difflib
import os
import typing
from dataclasses import dataclass, fields

import yaml

from maskco import vocab
from maskco.config_rules import RULES

PRESET_DIR = os.path.join(os.path.dirname(__file__), "configs")


class ConfigError(ValueError):
    """A preset or override names an unknown key or gives a bad value."""


# the values a string key takes (maskco.vocab: the modules that implement them read the same lists)
CHOICES = {
    "method": vocab.METHODS,
    "mph": vocab.MPH_KINDS,
    "mask_mode": vocab.MASK_MODES,
    "precision": vocab.PRECISIONS,
    "momentum_schedule": vocab.MOMENTUM_SCHEDULES,
    "key_bn": vocab.KEY_BNS,
    "roi_centering": vocab.ROI_CENTERINGS,
    "stem": vocab.STEMS,
    "init": vocab.INITS,
    "backend": vocab.BACKENDS,
    "device": vocab.DEVICES,
    "compile_mode": vocab.COMPILE_MODES,
    "prefetch": vocab.PREFETCH,
}


@dataclass(frozen=True)
class Config:
    # ---- method (DESIGN 4)
    method: str = "maskco"  # maskco | mocov2 (the paper's baseline: global pooling; unset keys take MOCOV2 below)
    arch: str = "resnet50"  # any torchvision resnet*; weights stay torchvision-shaped
    dilated: bool = False  # dilated C5 (stride 16 instead of 32)
    stem: str = "imagenet"  # imagenet (7x7 stride-2 conv1 + max-pool: C5 at stride 32) | cifar (3x3 stride-1 conv1, no max-pool: stride 8, for 32-64 px images)
    width: float = 1.0  # multiplier on every stage's channels (0.25: 16-32-64-128 for resnet18); 1 with the imagenet stem stays torchvision-shaped
    init: str = "torchvision"  # the trunk's convs at random init: torchvision (ResNet's kaiming_normal, fan_out) | pytorch (nn.Conv2d's default, kaiming_uniform a=sqrt(5))
    mph: str = "attn"  # Mask Prediction Head: attn (2 Transformer layers) | conv | none (ablation)
    mph_width: int = 512  # channels inside the MPH
    mph_layers: int = 2  # Transformer layers (attn) in the MPH
    mph_heads: int = 8  # attention heads in the MPH
    head_hidden: int = 2048  # projection head hidden width
    head_dim: int = 128  # projection head output width (the contrastive embedding)
    roi_output_size: int = 7  # RoI-align grid before averaging (sets the adaptive sampling count)
    roi_sampling_ratio: int = 2  # bilinear samples per bin per axis; <= 0: adaptive
    roi_fused: bool = True  # fused separable RoI-align-pool (False: torchvision roi_align + mean)
    roi_centering: str = "receptive"  # box -> C5 mapping: receptive (RoI centred on the box through the trunk's real receptive-field centres) | half_pixel (torchvision aligned=True, cell j at stride*(j+0.5): the old mapping, for ablation)
    num_negatives: int = 16  # M: negative key boxes per image [paper]
    intra_negatives: bool = False  # MaskCo(+in): also use the image's own M negatives
    other_positives: bool = False  # also use the other images' positives as negatives
    queue_size: int = 0  # MoCo-style queue of keys as extra negatives (0: off)
    temperature: float = 0.2  # InfoNCE temperature
    momentum: float = 0.999  # EMA momentum of the key encoder (start value if scheduled)
    momentum_schedule: str = "constant"  # constant | cosine (to 1.0 at the end of training)
    key_bn: str = "shuffle"  # key-branch BatchNorm: shuffle (shuffle-BN across every rank and virtual GPU) | sync (statistics of the whole global batch) | local (per virtual GPU, unshuffled)
    virtual_gpus: int = 1  # G: each process's batch behaves as G GPUs of batch_size / G images (BatchNorm groups, shuffle-BN, MaskCo's negatives); W ranks x G = W*G GPUs
    # ---- boxes (DESIGN 4.2), fractions of a view's area; pixels of the view
    box_area: tuple[float, float] = (0.04, 0.25)  # masked box area, fraction of the query view
    box_aspect: tuple[float, float] = (0.5, 2.0)  # aspect ratio range (log-uniform)
    box_min_size: float = 16.0  # minimum box side in pixels, in both views
    min_overlap: float = 0.04  # overlap of the crops below this fraction of the query crop: invalid
    negative_max_iou: float = 0.5  # negatives' max IoU with the positive
    mask_mode: str = "zero"  # zero | noise | blur | none (the paper's no-mask ablation)
    # ---- views (DESIGN 4.1): MoCo v2 augmentations
    image_size: int = 224  # view side in pixels
    crop_scale: tuple[float, float] = vocab.CROP_SCALE  # random resized crop area fraction [paper: (0.2, 1.0)]
    crop_ratio: tuple[float, float] = vocab.CROP_RATIO  # random resized crop aspect [paper: (3/4, 4/3)]
    flip_prob: float = 0.5  # horizontal flip probability, per view
    jitter: tuple[float, float, float, float] = vocab.JITTER  # colour jitter brightness contrast saturation hue [paper: (0.4, 0.4, 0.4, 0.1)]
    jitter_prob: float = vocab.JITTER_PROB  # probability of the colour jitter [paper: 0.8]
    gray_prob: float = vocab.GRAY_PROB  # probability of grayscale [paper: 0.2]
    blur_prob: float = vocab.BLUR_PROB  # probability of the Gaussian blur [paper: 0.5]
    blur_sigma: tuple[float, float] = vocab.BLUR_SIGMA  # Gaussian blur sigma range, pixels [paper: (0.1, 2.0)]
    # ---- data
    data: str = "sample"  # dataset path (ImageFolder, flat folder, .txt list, .beton, .tar shards); "sample": built-in sample set
    sample_images: int = 240  # size of the generated sample set when data == "sample"
    sample_dir: str = "data/sample"  # where the sample set is generated
    backend: str = "torch"  # torch | ffcv | dali | dali-cpu
    workers: int = -1  # decode workers per rank (-1: backend default)
    strict_data: bool = False  # stop on a corrupt image instead of skipping and counting it
    # ---- optimisation (DESIGN 4.7)
    batch_size: int = 32  # images per GPU (per process) [paper]
    epochs: int = 200  # passes over the data; the lr and momentum schedules span them all
    max_steps: int = 0  # stop after this many steps in total (0: all epochs); schedules still span all epochs
    base_lr: float = 0.03  # lr per 256 images; peak lr = base_lr * global batch / 256
    min_lr: float = 0.0  # cosine end value
    warmup_epochs: float = 10.0  # linear warm-up from 0
    weight_decay: float = 1e-4  # on >= 2-D weights; 1-D parameters (BN, biases) too only if weight_decay_all
    weight_decay_all: bool = False  # also decay 1-D parameters (MoCo v2 decays every parameter)
    sgd_momentum: float = 0.9  # SGD momentum
    # ---- speed (DESIGN 5)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (+ GradScaler) | fp32
    channels_last: bool = True  # NHWC memory format for the convolutions
    compile: bool = False  # torch.compile the whole step's forward (ready inputs, both encoders, logits, loss) and, through AOTAutograd, its backward
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs of the compiled step; CUDA only) | max-autotune-no-cudagraphs | max-autotune (+ CUDA graphs)
    compile_backend: str = "inductor"  # torch.compile backend (inductor; aot_eager traces and runs AOTAutograd without code generation)
    prefetch: str = "auto"  # the next batch's copy to the GPU and its ready inputs on a side stream during the step: auto (on for torch/ffcv on CUDA) | on | off
    # ---- run
    seed: int = 0  # seeds the model init, the data order and every random draw of the method
    out_dir: str = "runs/maskco"  # log, checkpoint and exports; a command line that changes the model gets <out_dir>-<key>-<value>
    resume: str = "auto"  # auto (latest checkpoint in out_dir, if any) | none | a checkpoint path
    log_every: int = 10  # steps between log lines (the only host syncs of the loop)
    ckpt_every: int = 0  # also checkpoint every N steps (0: only at the end of each epoch)
    keep_checkpoints: int = 2  # checkpoint files kept in out_dir, newest first; a damaged newest one falls back to the next
    dist_timeout: float = 1800.0  # seconds a collective waits for the other ranks before the run fails (a hung or lost rank)
    data_timeout: float = 600.0  # seconds to wait for one batch from a loader worker process (torch backend); 0: forever
    tensorboard: bool = False  # also write TensorBoard scalars to out_dir/tb (needs EXTRAS=...,tensorboard)
    knn_every: int = 0  # kNN monitor every N epochs (0: off); needs knn_train and knn_val
    knn_train: str = ""  # labelled train split for the kNN monitor
    knn_val: str = ""  # labelled val split for the kNN monitor
    export: bool = True  # export the final query backbone as a torchvision state dict

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def valid_keys() -> list[str]:
    return [f.name for f in fields(Config)]


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(
        f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(valid_keys())}"
    )


def _kind_name(kind) -> str:
    """A field's type in words: "an integer", "a pair of numbers", ..."""
    if typing.get_origin(kind) is tuple:
        return {2: "a pair of numbers, e.g. [0.2, 1.0]"}.get(len(typing.get_args(kind)),
                                                            f"a list of {len(typing.get_args(kind))} numbers")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _coerce(key: str, value, where: str):
    """Check ``value`` against the type of field ``key``; return it in that type."""
    kind = typing.get_type_hints(Config)[key]
    bad = ConfigError(f"config key {key!r} in {where}: expected {_kind_name(kind)}, got {value!r}")
    if typing.get_origin(kind) is tuple:
        size = len(typing.get_args(kind))
        if not isinstance(value, (list, tuple)) or len(value) != size:
            raise bad
        try:
            value = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise bad from None
    elif kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string: take every spelling float() does
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif kind is str:
        if value is None:
            value = ""
        if isinstance(value, bool) and "on" in CHOICES.get(key, ()):  # YAML 1.1 reads on / off as booleans
            value = "on" if value else "off"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        value = str(value)
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key {key!r} in {where}: {value!r} is not one of {', '.join(CHOICES[key])}")
    return value


def _check(cfg: Config) -> Config:
    """Every key against its rule (RULES), then the rules that tie keys together."""
    for key, (ok, must) in RULES.items():
        value = getattr(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key {key!r} {must}, got {_plain(value)!r}")
    if cfg.mph == "attn" and (cfg.mph_width % cfg.mph_heads or cfg.mph_width % 4):
        raise ConfigError(f"mph_width ({cfg.mph_width}) must be divisible by mph_heads ({cfg.mph_heads}) and by 4")
    if cfg.batch_size % cfg.virtual_gpus or cfg.batch_size // cfg.virtual_gpus < 2:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must split into virtual_gpus ({cfg.virtual_gpus}) groups "
                          "of >= 2 images (negatives come from the other images of a GPU)")
    if cfg.method == "maskco" and cfg.num_negatives == 0 and not cfg.other_positives and cfg.queue_size == 0:
        raise ConfigError("maskco needs negatives: num_negatives > 0, other_positives or queue_size")
    if cfg.method == "mocov2" and not cfg.other_positives and cfg.queue_size == 0:
        raise ConfigError("mocov2 needs negatives: queue_size > 0 (MoCo v2: 65536) or other_positives=true")
    return cfg


def load_preset(path: str) -> dict:
    """Read a YAML preset (a path, or a name in maskco/configs) into a dict of checked values."""
    if not os.path.exists(path) and os.path.exists(os.path.join(PRESET_DIR, path)):
        path = os.path.join(PRESET_DIR, path)
    if not os.path.exists(path) and os.path.exists(os.path.join(PRESET_DIR, path + ".yaml")):
        path = os.path.join(PRESET_DIR, path + ".yaml")
    if not os.path.exists(path):
        presets = sorted(p[:-5] for p in os.listdir(PRESET_DIR) if p.endswith(".yaml"))
        raise ConfigError(f"config preset {path} not found; built-in presets: {', '.join(presets)}")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config preset {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config preset {path} must be a mapping of key: value")
    values = {}
    for key, value in raw.items():
        if key not in valid_keys():
            raise _unknown_key(key, path)
        values[key] = _coerce(key, value, path)
    return values


def parse_override(arg: str) -> tuple[str, object]:
    """``--key=value`` -> (key, value checked against the field's type); value parsed as YAML."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --key=value")
    key, text = arg[2:].split("=", 1)
    key = key.replace("-", "_")
    if key not in valid_keys():
        raise _unknown_key(key, "the command line")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key, _coerce(key, value, "the command line")


# MoCo v2 as facebookresearch/moco trains it (main_moco.py --mlp --moco-t 0.2 --aug-plus --cos): global
# pooling, no MPH, a 65,536-key queue of all-gathered keys as the only negatives, weight decay on every
# parameter, cosine lr without warm-up. ``method: mocov2`` takes these unless a preset or override sets them.
MOCOV2 = {"mph": "none", "queue_size": 65536, "other_positives": False, "weight_decay_all": True,
          "warmup_epochs": 0.0, "temperature": 0.2, "momentum": 0.999}


def build_config(args: typing.Sequence[str] = (), base: dict | None = None) -> Config:
    """Presets (positional ``*.yaml`` or preset names) in order, then ``--key=value`` overrides; then, for
    ``method: mocov2``, the MoCo v2 values (``MOCOV2``) of every key that neither set."""
    values = dict(base or {})
    for arg in args:
        if arg.startswith("--"):
            key, value = parse_override(arg)
            values[key] = value
        else:
            values.update(load_preset(arg))
    if values.get("method") == "mocov2":
        values = {**MOCOV2, **values}
    return _check(Config(**values))


def method_label(cfg: Config) -> str:
    """What a run is, for tables and figures: "MoCo v2" only for the faithful baseline (``MOCOV2``);
    anything else names how it differs, e.g. "MoCo v2-like (queue_size=4096)"."""
    if cfg.method == "mocov2":
        # the warm-up length is not named: it is sized to the run (a preset's short run needs one) and
        # changes the schedule's first steps, not which method the run is
        changed = [f"{key}={_plain(getattr(cfg, key))}" for key, value in MOCOV2.items()
                   if getattr(cfg, key) != value and key != "warmup_epochs"]
        return f"MoCo v2-like ({', '.join(changed)})" if changed else "MoCo v2"
    name = "MaskCo(+in)" if cfg.intra_negatives else "MaskCo"
    notes = [f"{key}={getattr(cfg, key)}" for key, default in
             (("mph", "attn"), ("mask_mode", "zero"), ("roi_centering", "receptive")) if getattr(cfg, key) != default]
    notes += ["other_positives"] * cfg.other_positives + [f"queue_size={cfg.queue_size}"] * bool(cfg.queue_size)
    return f"{name} ({', '.join(notes)})" if notes else name


def config_from_dict(values: dict, where: str = "a checkpoint") -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. stored in a checkpoint), checking every key."""
    checked = {}
    for key, value in values.items():
        if key not in valid_keys():
            raise _unknown_key(key, where)
        checked[key] = _coerce(key, value, where)
    return _check(Config(**checked))


def replace(cfg: Config, **changes) -> Config:
    """A new Config with ``changes`` (checked); the original is never mutated."""
    return config_from_dict({**cfg.to_dict(), **changes}, "replace()")


# ---- derived values (logged once at start)
def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.batch_size * world_size


def peak_lr(cfg: Config, world_size: int) -> float:
    """The linear scaling rule: base_lr per 256 images [MoCo; DESIGN 4.7]."""
    return cfg.base_lr * global_batch(cfg, world_size) / 256


# fields that must agree between a checkpoint and the run resuming from it (the model's shape)
ARCHITECTURE_KEYS = (
    "method", "arch", "dilated", "stem", "width", "mph", "mph_width", "mph_layers", "mph_heads", "head_hidden",
    "head_dim", "queue_size",
)
__all__ = [
    "Config", "ConfigError", "build_config", "config_from_dict", "replace", "load_preset", "valid_keys",
    "global_batch", "peak_lr", "ARCHITECTURE_KEYS", "MOCOV2", "method_label",
]
