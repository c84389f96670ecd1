"""Photometric augmentation of the linear-classification training views, batched on the device.

OpenSelfSup's ``configs/benchmarks/linear_classification/imagenet/r50_multihead.py`` (the protocol the
MaskCo paper cites) trains its classifiers on

    RandomResizedCrop(224) -> RandomHorizontalFlip -> ColorJitter(0.4, 0.4, 0.4, hue=0)
    -> ToTensor -> Lighting (alphastd 0.1) -> Normalize(ImageNet mean, std)

and validates on Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize. The crops and the flip are the
loader's (``pipelines.build_loader``: ``crop_scale=(0.08, 1)`` for training, ``eval_mode`` for validation);
:class:`TrainAugment` is the rest of the training pipeline, one call per batch on the training device
with parameters drawn per image. Validation views are only normalised (``features.prepare_images``).

ColorJitter is ``maskco.augment.color_jitter`` (torchvision's tensor math, a random op order per image,
applied to every image as in the config, where it is not wrapped in RandomApply). torchvision drops a
hue range of 0 altogether; here the hue shift is drawn as exactly 0, which ``adjust_hue`` returns
unchanged, so hue is never touched either.
"""
from __future__ import annotations

import numpy
import torch

from maskco.augment import color_jitter, normalize, sample_photometric
from maskco.evaluate.features import to_unit

COLOR_JITTER = (0.4, 0.4, 0.4, 0.0)  # ColorJitter(brightness, contrast, saturation, hue) of the config
LIGHTING_STD = 0.1  # OpenSelfSup's Lighting: alphastd = 0.1
# AlexNet's PCA lighting noise (Krizhevsky et al., 2012, section 4.1): eigenvalues and eigenvectors (the
# columns of IMAGENET_EIGVEC, in RGB) of the ImageNet pixel colour covariance, pixels in [0, 1]. Values of
# fb.resnet.torch (datasets/imagenet.lua), which OpenSelfSup's Lighting copies
# (openselfsup/datasets/pipelines/transforms.py).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def lighting(x: torch.Tensor, alpha: torch.Tensor, eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC) -> torch.Tensor:
    """Add PCA lighting noise: ``x[n, c] + sum_j eigvec[c][j] * alpha[n, j] * eigval[j]`` at every pixel.

    x: float [N, 3, H, W], RGB in [0, 1] (before normalisation; not clamped after, as in OpenSelfSup).
    alpha: float [N, 3], the per-image weights of the three principal components (N(0, alphastd) draws).
    """
    vec = torch.tensor(eigvec, dtype=x.dtype).to(x.device, non_blocking=True)  # [3 (RGB), 3 (component)]
    val = torch.tensor(eigval, dtype=x.dtype).to(x.device, non_blocking=True)  # [3]
    shift = (alpha.to(x.dtype) * val) @ vec.T  # [N, 3]: one RGB offset per image
    return x + shift[:, :, None, None]


class TrainAugment:
    """uint8 training views [N, 3, S, S] -> normalised float [N, 3, S, S]: colour jitter, lighting, normalise.

    color_jitter: (brightness, contrast, saturation, hue) ranges, or None to skip the jitter.
    lighting_std: alphastd of the lighting noise; 0 skips it (grey images: it would tint them).
    Draws come from a generator on ``device`` that :meth:`set_epoch` reseeds from (seed, epoch, rank), so
    a run resumed at an epoch boundary sees the augmentation the uninterrupted run would have seen.
    """

    def __init__(self, device: torch.device | str, color_jitter: tuple | None = COLOR_JITTER,
                 lighting_std: float = LIGHTING_STD, seed: int = 0, rank: int = 0):
        if lighting_std < 0:
            raise ValueError(f"lighting_std must be >= 0, got {lighting_std}")
        self.color_jitter, self.lighting_std = color_jitter, lighting_std
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator(torch.device(device))
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        mixed = numpy.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0]
        self.generator.manual_seed(int(mixed))

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        x = to_unit(views)  # [N, 3, S, S] in [0, 1]: ToTensor
        n = x.shape[0]
        if self.color_jitter is not None:
            params = sample_photometric(n, self.generator, x.device, jitter=self.color_jitter, jitter_prob=1.0,
                                        gray_prob=0.0, blur_prob=0.0)
            x = color_jitter(x, params)
        if self.lighting_std > 0:
            alpha = torch.randn(n, 3, generator=self.generator, device=x.device) * self.lighting_std  # [N, 3]
            x = lighting(x, alpha)
        return normalize(x)
