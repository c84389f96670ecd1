"""The run's vocabulary: the values a setting may take and the paper's augmentation constants.

The ground floor of the package: it imports nothing of the project and nothing heavy (no torch), so
that the configuration (``maskco.config``) and everything that only reads a config (the command line,
``--help``) stand on it alone, and the modules that implement a setting (``model``, ``augment``, ``step``,
``pipelines``) read their lists from here rather than the config reading them from the implementation.
"""
from __future__ import annotations

METHODS = ("maskco", "mocov2")
# torchvision's ResNet family (torchvision.models.resnet.__all__'s constructors; maskco.trunk builds them, a
# test checks the two lists agree)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
         "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
STEMS = ("imagenet", "cifar")  # 7x7 stride-2 conv1 + max-pool | 3x3 stride-1 conv1, no max-pool
# the trunk's conv weights at random init: torchvision ResNet's kaiming_normal (fan_out) | nn.Conv2d's own default
INITS = ("torchvision", "pytorch")
MPH_KINDS = ("attn", "conv", "none")  # Mask Prediction Head: 2 Transformer layers | 2 Bottlenecks | ablation
ROI_CENTERINGS = ("receptive", "half_pixel")  # box -> C5 mapping (maskco.model.cell_centre)
MASK_MODES = ("zero", "noise", "blur", "none")  # how the masked box is filled (maskco.augment.mask_boxes)
KEY_BNS = ("shuffle", "sync", "local")  # the key branch's BatchNorm
MOMENTUM_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("torch", "ffcv", "dali", "dali-cpu")  # data backends (pipelines.BACKENDS says where each lives)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
PREFETCH = ("auto", "on", "off")

# MoCo v2's views [paper]: random resized crop and colour augmentation
CROP_SCALE = (0.2, 1.0)  # area fraction of the source image
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio
JITTER = (0.4, 0.4, 0.4, 0.1)  # ColorJitter brightness, contrast, saturation, hue
JITTER_PROB, GRAY_PROB, BLUR_PROB = 0.8, 0.2, 0.5
BLUR_SIGMA = (0.1, 2.0)  # Gaussian blur sigma range, pixels

# The linear probe (maskco.evaluate.linear): which stages it reads, how it pools them, and each protocol's
# defaults. multilayer: lr and milestones [paper], the rest OpenSelfSup's r50_multihead.py; lastlayer: MoCo.
PROTOCOLS = ("multilayer", "lastlayer")
POOLINGS = ("fixed", "adaptive")
PROTOCOL_DEFAULTS = {
    "multilayer": {"epochs": 90, "lr": 0.1, "weight_decay": 1e-4, "milestones": [30, 60], "nesterov": True,
                   "color_jitter": True, "lighting": True},
    "lastlayer": {"epochs": 100, "lr": 30.0, "weight_decay": 0.0, "milestones": [60, 80], "nesterov": False,
                  "color_jitter": False, "lighting": False},
}
