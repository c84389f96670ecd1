"""Geometry test helpers: images whose pixels say where they came from.

Shared by the box tests and by every backend's geometry test (torch / FFCV / DALI): a backend writes
:func:`coordinate_image` to its dataset format, loads a batch, runs ``maskco.boxes.sample_boxes`` on
the reported crops, and calls :func:`assert_same_source_region` on its own views. If the backend
reports a crop that differs from the one it cut (wrong offset, swapped x/y, flip applied to the
other view, ...), the masked box and its positive show different parts of the image and it fails.

Encoding (uint8, so that it survives every backend's real path, JPEG included):
    R = round(255 * x), G = round(255 * y), B = 128, with (x, y) in [0, 1] the source coordinates
    of the pixel centre: x = (j + 0.5) / W, y = (i + 0.5) / H.
A linear ramp stays linear under bilinear / antialiased resizing, so inside a view the decoded
values are the source coordinates up to uint8 rounding (0.5 / 255 per quantisation) and half a
source pixel at the image border. Keep sources >= 128 px and JPEG quality high (>= 95); pass a
larger ``atol`` for lossy paths.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """uint8 [3, H, W]: R encodes the source x of each pixel centre, G its y, B is constant 128."""
    x = (torch.arange(width, dtype=torch.float64) + 0.5) / width  # [W]
    y = (torch.arange(height, dtype=torch.float64) + 0.5) / height  # [H]
    r = torch.round(255 * x).expand(height, width)  # [H, W]
    g = torch.round(255 * y)[:, None].expand(height, width)  # [H, W]
    b = torch.full((height, width), 128.0, dtype=torch.float64)
    return torch.stack([r, g, b]).to(torch.uint8)  # [3, H, W]


def decode_coordinates(view: torch.Tensor) -> torch.Tensor:
    """[3, S, S] (or [..., 3, S, S]) view of a coordinate image -> float32 [2, S, S]: source x, y."""
    return view[..., :2, :, :].float() / 255


def cut_view(image: torch.Tensor, crop_row: torch.Tensor | Sequence[float], size: int) -> torch.Tensor:
    """Cut one view like a backend does: crop, resize to size x size (bilinear, antialiased), then
    mirror if flipped. image: uint8 [3, H, W]; crop_row: [5] = x0, y0, x1, y1 (fractions), flipped.

    Backends crop on the source pixel grid, so the crop must land on it (checked)."""
    _, height, width = image.shape
    x0, y0, x1, y1, flipped = (float(v) for v in crop_row)
    edges = [x0 * width, y0 * height, x1 * width, y1 * height]
    left, top, right, bottom = (round(e) for e in edges)
    if max(abs(e - r) for e, r in zip(edges, (left, top, right, bottom))) > 1e-3:
        raise ValueError(f"crop_row {list(map(float, crop_row))} is not on the {width}x{height} pixel grid")
    view = TF.resized_crop(image, top, left, bottom - top, right - left, [size, size],
                           interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.horizontal_flip(view) if flipped > 0.5 else view  # [3, size, size]


def pixel_crops(n: int, height: int, width: int, generator: torch.Generator,
                scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                flip_prob: float = 0.5) -> torch.Tensor:
    """float32 [N, 5] RandomResizedCrop-like crops on the pixel grid of an H x W image (the Batch
    crop format). Area and ratio are drawn like torchvision's and clamped to fit, not retried."""
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)  # [N, 5]
    area = (scale[0] + u[:, 0] * (scale[1] - scale[0])) * height * width
    log_r = torch.log(torch.tensor(ratio, dtype=torch.float64))
    r = torch.exp(log_r[0] + u[:, 1] * (log_r[1] - log_r[0]))
    w = torch.sqrt(area * r).round().clamp(1, width)  # [N] pixels
    h = torch.sqrt(area / r).round().clamp(1, height)
    left = torch.floor(u[:, 2] * (width - w + 1)).clamp(max=width - w)
    top = torch.floor(u[:, 3] * (height - h + 1)).clamp(max=height - h)
    flipped = (u[:, 4] < flip_prob).double()
    crops = [left / width, top / height, (left + w) / width, (top + h) / height, flipped]
    return torch.stack(crops, dim=-1).float()  # [N, 5]


def assert_same_source_region(view_q: torch.Tensor, view_k: torch.Tensor, box_q: torch.Tensor,
                              box_k: torch.Tensor, *, valid: Optional[torch.Tensor] = None,
                              atol: float = 0.01, fractions: Sequence[float] = (0.25, 0.5, 0.75)) -> None:
    """Assert that ``box_q`` in ``view_q`` and ``box_k`` in ``view_k`` cover the same source region.

    view_q, view_k: uint8 [3, S, S] or [N, 3, S, S] views of :func:`coordinate_image`;
    box_q, box_k:   [4] or [N, 4] float xyxy view pixels; valid: optional [N] bool, others skipped;
    atol:           tolerance in source fractions (see the module docstring).

    Decoded source coordinates are sampled bilinearly at ``fractions`` of each box's width and
    height (pixel centres at i + 0.5), giving a grid of source points per box. Their column-mean x and
    row-mean y must agree between the two boxes after sorting, which checks both the position and the
    extent of the region, and allows one view to be mirrored relative to the other.
    """
    if view_q.dim() == 3:
        view_q, view_k, box_q, box_k = view_q[None], view_k[None], box_q[None], box_k[None]
    samples = range(view_q.shape[0]) if valid is None else torch.nonzero(valid).flatten().tolist()
    for i in samples:
        points_q = _profile(view_q[i], box_q[i], fractions)  # [2, F] sorted source x, y
        points_k = _profile(view_k[i], box_k[i], fractions)
        error = (points_q - points_k).abs().max().item()
        if not error <= atol:
            raise AssertionError(
                f"sample {i}: boxes cover different source regions (max error {error:.4f} > {atol}):\n"
                f"  box_q {box_q[i].tolist()} -> source x, y {points_q.tolist()}\n"
                f"  box_k {box_k[i].tolist()} -> source x, y {points_k.tolist()}")


def _profile(view: torch.Tensor, box: torch.Tensor, fractions: Sequence[float]) -> torch.Tensor:
    """Sorted source x of the box's columns and y of its rows at ``fractions`` -> float32 [2, F]."""
    size = view.shape[-1]
    coords = decode_coordinates(view)  # [2, S, S]
    f = torch.tensor(fractions, dtype=torch.float32)  # [F]
    u = box[0].float() + f * (box[2] - box[0]).float()  # [F] pixel x
    v = box[1].float() + f * (box[3] - box[1]).float()  # [F] pixel y
    grid = torch.stack(torch.broadcast_tensors(u[None, :], v[:, None]), dim=-1)  # [F, F, 2] (x, y)
    grid = grid / size * 2 - 1  # align_corners=False: pixel centre i + 0.5
    sampled = F.grid_sample(coords[None], grid[None], mode="bilinear", padding_mode="border",
                            align_corners=False)[0]  # [2, F(v), F(u)]
    x = sampled[0].mean(dim=0).sort().values  # [F] one per column
    y = sampled[1].mean(dim=1).sort().values  # [F] one per row
    return torch.stack([x, y])
