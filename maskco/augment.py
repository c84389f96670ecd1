"""Batched photometric augmentation, normalisation and masking on the training device.

Per step, :func:`sample_photometric` (and :func:`draw_mask_noise` for the ``noise`` mask) draw the
randomness and :func:`views_from_params` turns a Batch's views (uint8 [N, 3, S, S], geometry only) into
model inputs: MoCo v2 colour augmentation with independent parameters per sample and per view
(docs/DESIGN.md 4.1), ImageNet normalisation, and the MaskCo mask over the query box (4.3). The step
draws them in ``maskco.method.draw_noise`` and runs :func:`views_from_params` in
``maskco.method.inputs_from_noise``.

The colour ops follow torchvision's tensor math (``transforms.v2.functional``), so a batch here
equals a loop of torchvision calls with the same parameters (tests/test_augment.py). Everything is
batched with per-sample parameters held in tensors: no Python loop over samples, no data-dependent
shapes, no host sync, so the step stays asynchronous and ``torch.compile`` can trace it.
"""
from typing import NamedTuple, Optional

import torch

from maskco import vocab

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma, with 0.299 written as 0.2989).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
MASK_MODES = vocab.MASK_MODES
# Op ids inside PhotometricParams.order: torchvision ColorJitter's fn_idx numbering.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# `blur` mask: Gaussian sigma as a fraction of the image side (14 px at 224): erases the box's detail.
MASK_BLUR_SIGMA = 1 / 16


class PhotometricParams(NamedTuple):
    """Per-sample photometric parameters; every field has leading dimension N.

    brightness, contrast, saturation: float [N]  blend factors (1 = unchanged)
    hue:       float [N]     hue shift in turns, in [-0.5, 0.5]
    order:     int64 [N, 4]  permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE): jitter order
    jitter, grayscale, blur: bool [N]  whether each of the three random transforms is applied
    sigma:     float [N]     Gaussian blur standard deviation in view pixels
    """

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    jitter: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor


# MoCo v2's colour augmentation [paper] (the Config's defaults are these)
JITTER, JITTER_PROB, GRAY_PROB, BLUR_PROB = vocab.JITTER, vocab.JITTER_PROB, vocab.GRAY_PROB, vocab.BLUR_PROB
BLUR_SIGMA = vocab.BLUR_SIGMA


def sample_photometric(n: int, generator: Optional[torch.Generator], device: torch.device | str, *,
                       jitter=JITTER, jitter_prob: float = JITTER_PROB, gray_prob: float = GRAY_PROB,
                       blur_prob: float = BLUR_PROB, blur_sigma=BLUR_SIGMA) -> PhotometricParams:
    """Draw MoCo v2's colour augmentation for ``n`` samples, independently per sample.

    Semantics of ``RandomApply([ColorJitter(*jitter)], p=jitter_prob), RandomGrayscale(gray_prob),
    RandomApply([GaussianBlur(sigma=blur_sigma)], p=blur_prob)``: factors uniform in
    [max(0, 1 - j), 1 + j], hue shift uniform in [-h, h], a uniformly random op order per sample.
    ``generator`` (or the default RNG when None) must live on ``device``.
    """
    device = torch.device(device)
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise ValueError(f"jitter must be 4 non-negative values (hue <= 0.5), got {jitter}")
    for name, p in (("jitter_prob", jitter_prob), ("gray_prob", gray_prob), ("blur_prob", blur_prob)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
        raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, got {blur_sigma}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, but device is {device}")

    b, c, s, h = jitter
    names = ("brightness", "contrast", "saturation", "hue", "sigma", "jitter", "gray", "blur")
    low = (max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h, blur_sigma[0], 0.0, 0.0, 0.0)
    high = (1 + b, 1 + c, 1 + s, h, blur_sigma[1], 1.0, 1.0, 1.0)
    # One draw for all eight uniforms (few kernel launches: this runs every step). non_blocking: a
    # blocking host -> GPU copy would synchronise the stream.
    span = [hi - lo for lo, hi in zip(low, high)]
    bounds = torch.tensor([low, span]).to(device, non_blocking=True)  # [2, 8]
    u = torch.rand(n, len(names), generator=generator, device=device)  # [N, 8]
    values = dict(zip(names, torch.addcmul(bounds[0], u, bounds[1]).unbind(dim=1)))  # [N] each
    order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)  # [N, 4] uniform perms
    return PhotometricParams(
        values["brightness"], values["contrast"], values["saturation"], values["hue"], order,
        values["jitter"] < jitter_prob, values["gray"] < gray_prob, values["blur"] < blur_prob,
        values["sigma"])


def default_blur_kernel_size(image_size: int) -> int:
    """Gaussian blur kernel for ``image_size`` px views: about 10 % of the side, odd, at least 3.

    ``int(0.1 * S)`` rounded up to odd (SimCLR/BYOL's rule, 23 at 224 px; 9 at 96 px).
    """
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def mask_blur_kernel_size(image_size: int) -> int:
    """Kernel of the ``blur`` mask: +-3 sigma (sigma = S / 16), capped so reflect padding fits."""
    return max(1, min(2 * int(3 * MASK_BLUR_SIGMA * image_size) + 1, 2 * (image_size // 2) - 1))


def apply_photometric(views: torch.Tensor, params: PhotometricParams,
                      blur_kernel_size: Optional[int] = None) -> torch.Tensor:
    """uint8 views [N, 3, S, S] -> float32 [N, 3, S, S] in [0, 1]: jitter, grayscale, blur.

    ``blur_kernel_size`` defaults to :func:`default_blur_kernel_size` of the view size.
    """
    _check_views(views, "views")
    if params.order.shape != (views.shape[0], 4):
        raise ValueError(f"params are for {params.order.shape[0]} samples, views has {views.shape[0]}")
    if blur_kernel_size is None:
        blur_kernel_size = default_blur_kernel_size(min(views.shape[-2:]))
    x = views.to(torch.float32).mul_(1 / 255)  # [N, 3, S, S], torchvision's ToDtype(scale=True)
    x = color_jitter(x, params)
    x = torch.where(params.grayscale[:, None, None, None], rgb_to_grayscale(x).expand_as(x), x)
    blurred = gaussian_blur(x, params.sigma, blur_kernel_size)
    return torch.where(params.blur[:, None, None, None], blurred, x)  # [N, 3, S, S]


def color_jitter(x: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
    """ColorJitter with per-sample factors and order; x float [N, 3, H, W] in [0, 1].

    Brightness, contrast and saturation are all torchvision's ``clamp(f * x + (1 - f) * ref)`` with
    ref = 0, the mean grey level, or the grey image, so one blend pass applies a different one of
    them to each sample. Hue is the expensive op; it is computed once for all samples: three blend
    passes apply each sample's ops before its hue (identity, f = 1, elsewhere), then hue, then three
    passes apply the ops after it. That is 6 cheap passes + 1 hue instead of 4 x (3 blends + hue).
    """
    on = params.jitter
    factors = torch.stack([params.brightness, params.contrast, params.saturation], 1)  # [N, 3]
    factors = torch.where(on[:, None], factors, 1.0)
    hue_at = (params.order == HUE).to(torch.int64).argmax(1, keepdim=True)  # [N, 1] slot of hue
    slots = torch.arange(3, device=x.device)  # [3]
    # The three blend ops in order with hue removed: slot k is order[k] before hue, order[k + 1] after.
    blend_order = torch.where(slots < hue_at, params.order[:, :3], params.order[:, 1:])  # [N, 3]
    # Pass k < 3 applies blend op k if it comes before hue, pass 3 + k if it comes after.
    op = blend_order.repeat(1, 2)  # [N, 6]
    active = torch.cat([slots < hue_at, slots >= hue_at], dim=1)  # [N, 6]
    f = torch.where(active, factors.gather(1, op), 1.0)  # [N, 6]; f = 1 is exactly the identity
    w_mean = (1 - f) * (op == CONTRAST)  # [N, 6]
    w_gray = (1 - f) * (op == SATURATION)  # [N, 6]
    coef = torch.stack([f, w_mean, w_gray])[..., None, None, None]  # [3, N, 6, 1, 1, 1]
    for k in range(6):
        if k == 3:
            x = adjust_hue(x, torch.where(on, params.hue, 0.0))
        x = _blend(x, *coef[:, :, k])
    return x


def _blend(x: torch.Tensor, f: torch.Tensor, w_mean: torch.Tensor, w_gray: torch.Tensor):
    """clamp(f x + w_mean mean(gray) + w_gray gray): brightness, contrast or saturation per sample.

    x float [N, 3, H, W]; f, w_mean, w_gray [N, 1, 1, 1] with w_* = 1 - f for the sample's op, 0 else.
    """
    gray = rgb_to_grayscale(x)  # [N, 1, H, W]
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # [N, 1, 1, 1], contrast's mean grey level
    ref = torch.addcmul(w_mean * mean, gray, w_gray)  # [N, 1, H, W] = (1 - f) * (0 | mean | gray)
    return torch.addcmul(ref, x, f).clamp_(0, 1)  # [N, 3, H, W]


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W] -> [N, 1, H, W] luma with torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])[:, None]


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shift hue by hue[n] turns through RGB -> HSV -> RGB; x float [N, 3, H, W] in [0, 1].

    torchvision's HSV model (Pillow's: V = max, S = (max - min) / max, hue from the sextant of the
    max channel), written with fewer passes: HSV -> RGB as ``c = V - V S clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n_c + 6 H) mod 6``, n = (5, 3, 1) for (r, g, b), and V S = max - min. Algebraically
    identical to torchvision's table lookup, about 3x faster on CPU; results differ by float rounding
    (~1e-6). Samples with hue[n] == 0 are returned unchanged (no round-trip rounding).
    """
    r, g, b = x.unbind(dim=1)  # [N, H, W] each
    minc, maxc = torch.aminmax(x, dim=1)
    span = maxc - minc  # = V S
    max_r, max_g = maxc == r, maxc == g  # ties: r before g before b, as torchvision
    diff = torch.where(max_r, g - b, torch.where(max_g, b - r, r - g))
    offset = torch.where(max_r, 0.0, torch.where(max_g, 2.0, 4.0))
    h6 = diff / torch.where(span == 0, 1.0, span) + offset  # 6 H; grey pixels: span = 0, any H works
    h6 = (h6 + 6 * hue[:, None, None]).remainder_(6)  # [N, H, W]
    sextant = torch.arange(5.0, 0.0, -2.0, device=x.device)[:, None, None]  # [3, 1, 1] = 5, 3, 1
    k = (h6[:, None] + sextant).remainder_(6)  # [N, 3, H, W]
    weight = torch.minimum(k, 4 - k).clamp_(0, 1)
    out = (maxc[:, None] - span[:, None] * weight).clamp_(0, 1)  # [N, 3, H, W]
    return torch.where((hue != 0)[:, None, None, None], out, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur sample n with a Gaussian of std sigma[n] px; x float [N, C, H, W].

    torchvision's kernel (normalised exp(-d^2 / 2 sigma^2) over kernel_size taps) and reflect
    padding, as a separable depthwise convolution: one group per (sample, channel), so each sample
    gets its own 1-D kernel in one conv per axis (2K instead of K^2 multiply-adds per pixel).
    """
    n, c, h, w = x.shape
    if kernel_size < 1 or kernel_size % 2 == 0 or kernel_size // 2 >= min(h, w):
        raise ValueError(f"kernel_size (blur_kernel_size) must be odd, positive, and its half below the "
                         f"image side {min(h, w)}, got {kernel_size}")
    lim = (kernel_size - 1) / (2.0 * 2.0 ** 0.5)  # torchvision's parametrisation of the taps
    taps = torch.linspace(-lim, lim, kernel_size, dtype=x.dtype, device=x.device)  # [K]
    kernel = torch.softmax((taps / sigma.to(x.dtype)[:, None]).pow(2).neg(), dim=1)  # [N, K]
    kernel = kernel.repeat_interleave(c, dim=0)  # [N * C, K]
    pad = kernel_size // 2
    y = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, kernel[:, None, None, :], groups=n * c)  # [1, N*C, H+2p, W]
    y = torch.nn.functional.conv2d(y, kernel[:, None, :, None], groups=n * c)  # [1, N*C, H, W]
    return y.reshape(n, c, h, w)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std per channel; x float [N, 3, H, W]; mean, std: 3 numbers or [3, 1, 1] tensors
    on x's device (:func:`normalize_constants`: what a compiled or graph-captured step passes, so that
    its graph holds no host-to-device copy)."""
    if not isinstance(mean, torch.Tensor):
        mean, std = normalize_constants(x.device, x.dtype, mean, std)
    return (x - mean) / std


def normalize_constants(device, dtype=torch.float32, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple:
    """(mean, std) as [3, 1, 1] tensors on ``device``."""
    # non_blocking: a blocking host -> GPU copy would synchronise the stream every step.
    return tuple(torch.tensor(v, dtype=dtype)[:, None, None].to(device, non_blocking=True) for v in (mean, std))


def mask_boxes(x: torch.Tensor, boxes: torch.Tensor, mode: str = "zero",
               generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fill each sample's box; x normalised float [N, 3, H, W], boxes float [N, 4] xyxy in pixels.

    Pixel (row i, col j) is inside when its centre lies in the half-open box:
    x0 <= j + 0.5 < x1 and y0 <= i + 0.5 < y1 (so boxes that share an edge never share a pixel).
    Modes: ``zero`` (0 = the dataset mean colour after normalisation), ``noise`` (standard normal,
    drawn from ``generator``), ``blur`` (a strongly blurred copy of the image, sigma = S / 16),
    ``none`` (x unchanged: the paper's no-mask ablation). ``noise``: the ``noise`` mode's fill drawn
    beforehand (:func:`draw_mask_noise`), instead of drawing it here from ``generator``.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float [N, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    n, _, h, w = x.shape
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must have shape [{n}, 4] to match x, got {tuple(boxes.shape)}")
    if mode == "none":
        return x
    boxes = boxes.to(torch.float32)
    cols = torch.arange(0.5, w, device=x.device)  # [W] pixel centres
    rows = torch.arange(0.5, h, device=x.device)  # [H]
    in_x = (cols >= boxes[:, 0:1]) & (cols < boxes[:, 2:3])  # [N, W]
    in_y = (rows >= boxes[:, 1:2]) & (rows < boxes[:, 3:4])  # [N, H]
    inside = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # [N, 1, H, W]
    if mode == "zero":
        return x.masked_fill(inside, 0.0)
    if mode == "noise":
        fill = draw_mask_noise(x.shape, generator, x.device, x.dtype) if noise is None else noise
    else:  # blur
        sigma = torch.full((n,), MASK_BLUR_SIGMA * min(h, w), device=x.device)  # [N]
        fill = gaussian_blur(x, sigma, mask_blur_kernel_size(min(h, w)))
    return torch.where(inside, fill, x)  # [N, 3, H, W]


def draw_mask_noise(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """The ``noise`` mask's fill: standard normal of the query views' shape [N, 3, S, S]."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def views_from_params(view_q: torch.Tensor, view_k: torch.Tensor, masked: torch.Tensor, params: PhotometricParams,
                      mask_noise: Optional[torch.Tensor], *, mask_mode: str = "zero",
                      out_dtype: torch.dtype = torch.float32, channels_last: bool = True,
                      blur_kernel_size: Optional[int] = None, mean_std: Optional[tuple] = None) -> tuple:
    """Batch views -> model inputs (x_q, x_k), each [N, 3, S, S] of ``out_dtype``, given the random draws.

    view_q, view_k: uint8 [N, 3, S, S]; masked: float [N, 4] xyxy query-view pixels (the box to hide,
    ``boxes.boxes_from_uniforms(...).masked``); params: :func:`sample_photometric` for 2N rows, rows
    [0, N) the query's and [N, 2N) the key's; mask_noise: the ``noise`` mask's fill
    (:func:`draw_mask_noise`, None for the other modes). Both views are augmented and normalised, only
    the query view is masked. ``mean_std``: :func:`normalize_constants` on the views' device (made here
    if None). A pure function of tensors with static shapes and no host sync, what the compiled step
    runs; its argument checks read only shapes, dtypes and strings (no sync, nothing for a compiled
    graph to break on).
    """
    _check_views(view_q, "view_q")
    _check_views(view_k, "view_k")
    if view_k.shape != view_q.shape:
        raise ValueError(f"view_k shape {tuple(view_k.shape)} differs from view_q {tuple(view_q.shape)}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    n = view_q.shape[0]
    if masked.shape != (n, 4):
        raise ValueError(f"masked must have shape [{n}, 4] to match view_q, got {tuple(masked.shape)}")
    # Both views as one batch of 2N: half the kernel launches, which dominate at 32 images per GPU.
    x = apply_photometric(torch.cat([view_q, view_k]), params, blur_kernel_size)
    x = normalize(x, *mean_std) if mean_std is not None else normalize(x)
    x_q = mask_boxes(x[:n], masked, mask_mode, noise=mask_noise)  # the key view is never masked
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x_q.to(dtype=out_dtype, memory_format=fmt), x[n:].to(dtype=out_dtype, memory_format=fmt)


def _check_views(views: torch.Tensor, name: str) -> None:
    if not isinstance(views, torch.Tensor) or views.dtype != torch.uint8:
        raise ValueError(f"{name} must be a uint8 tensor, got {getattr(views, 'dtype', type(views))}")
    if views.ndim != 4 or views.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3, H, W], got {tuple(views.shape)}")
