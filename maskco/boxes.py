"""Crop windows -> the masked box (query view) and the key boxes (key view). docs/DESIGN.md 4.2.

Every backend reports where it cut each view (``crop = [x0, y0, x1, y1, flipped]`` in [0, 1] source
coordinates), so box pairing lives here, once, for all of them. Convention: a view is the source
region [x0, x1] x [y0, y1] resized to S x S and then, if flipped, mirrored horizontally; view pixel
u in [0, S] sits at source x = x0 + (u / S)(x1 - x0), or x0 + (1 - u / S)(x1 - x0) when flipped.

The masked box is drawn in source coordinates inside the overlap of the two crops and mapped into
both views, so the query's masked region and the key's positive show the same part of the image.
Negatives are drawn in the key view. Everything is batched tensor code on the crops' device. The step
runs the pure pair: :func:`draw_uniforms` (every random number, from an explicit generator) then
:func:`boxes_from_uniforms`; :func:`sample_boxes` is their convenience wrapper, with argument checks.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional, Sequence

import torch


NEGATIVE_TRIES = 16  # candidates drawn per negative box (rejection sampling against negative_max_iou)


class BoxSample(NamedTuple):
    """Boxes for one batch, float xyxy in view pixels (views are S x S).

    masked: [N, 4]         the box to mask in the query view
    keys:   [N, 1 + M, 4]  key-view boxes; index 0 is the positive (the masked region), 1.. negatives
    valid:  [N] bool       False where the crops' overlap cannot hold a box; leave these out of the loss
    """

    masked: torch.Tensor
    keys: torch.Tensor
    valid: torch.Tensor


def source_to_view(boxes_src: torch.Tensor, crop: torch.Tensor, image_size: int) -> torch.Tensor:
    """Map boxes from [0, 1] source coordinates into the pixels of the view cut at ``crop``.

    boxes_src: [N, 4] or [N, L, 4] xyxy; crop: [N, 5]. Returns the same shape as ``boxes_src``.
    A flip mirrors x (u -> S - u) and swaps x0/x1 so that the result stays x0 <= x1.
    """
    x0, y0, x1, y1, flipped = _crop_for(boxes_src, crop, "boxes_src").unbind(-1)  # each [N(, 1)]
    bx0, by0, bx1, by1 = boxes_src.unbind(-1)  # each [N(, L)]
    u0 = (bx0 - x0) / (x1 - x0) * image_size
    u1 = (bx1 - x0) / (x1 - x0) * image_size
    v0 = (by0 - y0) / (y1 - y0) * image_size
    v1 = (by1 - y0) / (y1 - y0) * image_size
    u0, u1 = _mirror(u0, u1, flipped, image_size)
    return torch.stack([u0, v0, u1, v1], dim=-1)  # [N(, L), 4]


def view_to_source(boxes_px: torch.Tensor, crop: torch.Tensor, image_size: int) -> torch.Tensor:
    """Map boxes from the pixels of the view cut at ``crop`` back to [0, 1] source coordinates.

    boxes_px: [N, 4] or [N, L, 4] xyxy; crop: [N, 5]. Inverse of :func:`source_to_view`.
    """
    x0, y0, x1, y1, flipped = _crop_for(boxes_px, crop, "boxes_px").unbind(-1)  # each [N(, 1)]
    u0, v0, u1, v1 = boxes_px.unbind(-1)  # each [N(, L)]
    u0, u1 = _mirror(u0, u1, flipped, image_size)  # undo the flip first: mirroring is its own inverse
    bx0 = x0 + u0 / image_size * (x1 - x0)
    bx1 = x0 + u1 / image_size * (x1 - x0)
    by0 = y0 + v0 / image_size * (y1 - y0)
    by1 = y0 + v1 / image_size * (y1 - y0)
    return torch.stack([bx0, by0, bx1, by1], dim=-1)  # [N(, L), 4]


def draw_uniforms(n: int, num_negatives: int, negative_max_iou: Optional[float], generator: Optional[torch.Generator],
                  device, dtype=torch.float32, tries: int = NEGATIVE_TRIES) -> tuple:
    """Every random number :func:`boxes_from_uniforms` uses, in this order: ``u_box [N, 4]`` (the masked
    box's area, aspect and position) then ``u_negatives [N, M, T, 4]`` (T = ``tries`` candidates per
    negative; T = 1 when negatives have no IoU limit, ``negative_max_iou`` None). Uniform in [0, 1)."""
    tries = tries if negative_max_iou is not None else 1
    u_box = torch.rand(n, 4, generator=generator, device=device, dtype=dtype)  # [N, 4]
    u_negatives = torch.rand(n, num_negatives, tries, 4, generator=generator, device=device,
                             dtype=dtype)  # [N, M, T, 4]
    return u_box, u_negatives


def boxes_from_uniforms(crop_q: torch.Tensor, crop_k: torch.Tensor, image_size: int, u_box: torch.Tensor,
                        u_negatives: torch.Tensor, *, area: Sequence[float] = (0.04, 0.25),
                        aspect: Sequence[float] = (0.5, 2.0), min_size: float = 16.0, min_overlap: float = 0.04,
                        negative_max_iou: Optional[float] = 0.5) -> BoxSample:
    """The masked box, its positive and M negative key boxes for each sample, given the random numbers
    (:func:`draw_uniforms`): a pure function of tensors with static shapes and no host sync, what the
    compiled step runs. No argument checks (:func:`sample_boxes` checks them).

    crop_q, crop_k: float32/float64 [N, 5], ``x0, y0, x1, y1, flipped`` (the Batch contract).
    image_size:     S, the side of both (square) views in pixels.
    u_box, u_negatives: [N, 4] and [N, M, T, 4] uniforms in the crops' dtype; M = ``num_negatives``.
    area:           box area as a fraction of the view's area, uniform in this range.
    aspect:         width / height, log-uniform in this range.
    min_size:       smallest side in pixels: of the masked box in both views, of a negative.
    min_overlap:    a sample is valid only if the crops' overlap covers this fraction of the query crop.
    negative_max_iou: largest IoU of a negative with the positive (None: no limit). Each negative is
                    the first of the T candidates that meets it, else the least overlapping one.

    Invalid samples (overlap under ``min_overlap`` of the query crop, or narrower than ``min_size``
    pixels in either view) still get well-formed boxes: the masked box is drawn in the whole query
    view and the "positive" is the same pixel box in the key view.
    Returns :class:`BoxSample`; tensors on the crops' device, in their dtype.
    """
    size = float(image_size)
    valid, region, min_src = _overlap(crop_q, crop_k, size, min_size, min_overlap)

    # ---- the masked box, drawn in source coordinates inside the overlap (the query crop if invalid)
    u = u_box  # [N, 4]
    w_px, h_px = _box_sizes(u[:, 0], u[:, 1], area, aspect, size)  # [N] each, query-view pixels
    crop_wh = crop_q[:, 2:4] - crop_q[:, 0:2]  # [N, 2] query crop size in source units
    region_wh = region[:, 2:] - region[:, :2]  # [N, 2]
    wh = torch.stack([w_px, h_px], dim=-1) * crop_wh / size  # [N, 2] to source units
    wh = torch.maximum(torch.minimum(wh, region_wh), min_src)  # clip to the region, then >= min_size
    lo = region[:, :2] + u[:, 2:] * (region_wh - wh).clamp(min=0)  # [N, 2] top-left corner
    box_src = torch.cat([lo, lo + wh], dim=-1)  # [N, 4]
    masked = source_to_view(box_src, crop_q, image_size).clamp(0, size)  # [N, 4]
    positive = source_to_view(box_src, crop_k, image_size).clamp(0, size)  # [N, 4]
    positive = torch.where(valid[:, None], positive, masked)  # no shared region: any finite box will do

    # ---- negatives, drawn in the key view with the masked box's size distribution
    negatives = _negatives(positive, u_negatives, size, area, aspect, min_size, negative_max_iou)  # [N, M, 4]
    keys = torch.cat([positive[:, None], negatives], dim=1)  # [N, 1 + M, 4]
    return BoxSample(masked=masked, keys=keys, valid=valid)


def sample_boxes(crop_q: torch.Tensor, crop_k: torch.Tensor, image_size: int, num_negatives: int = 16,
                 generator: Optional[torch.Generator] = None, *, area: Sequence[float] = (0.04, 0.25),
                 aspect: Sequence[float] = (0.5, 2.0), min_size: float = 16.0, min_overlap: float = 0.04,
                 negative_max_iou: Optional[float] = 0.5, tries: int = NEGATIVE_TRIES,
                 check_values: bool = True) -> BoxSample:
    """The convenience wrapper of the pure pair the step runs: check the arguments, then
    :func:`draw_uniforms` from ``generator``, then :func:`boxes_from_uniforms` (see it for the
    arguments and the result). For callers outside the step (the bench, tests, tools).

    tries:          candidates drawn per negative (rejection sampling against ``negative_max_iou``).
    check_values:   check crops for NaN / range errors; costs one host sync, so a trusted caller may
                    turn it off. Shape, dtype and device checks are free.
    Raises ValueError naming the first bad argument.
    """
    _check_inputs(crop_q, crop_k, image_size, num_negatives, generator, area, aspect, min_size,
                  min_overlap, negative_max_iou, tries, check_values)
    u_box, u_negatives = draw_uniforms(crop_q.shape[0], num_negatives, negative_max_iou, generator, crop_q.device,
                                       crop_q.dtype, tries)
    return boxes_from_uniforms(crop_q, crop_k, image_size, u_box, u_negatives, area=area, aspect=aspect,
                               min_size=min_size, min_overlap=min_overlap, negative_max_iou=negative_max_iou)


def _overlap(crop_q, crop_k, size, min_size, min_overlap):
    """Per sample: valid [N] bool, the region to draw the masked box in [N, 4] (source units) and
    the smallest box width/height there [N, 2] (source units, so that it is >= min_size pixels)."""
    lo = torch.maximum(crop_q[:, 0:2], crop_k[:, 0:2])  # [N, 2]
    hi = torch.minimum(crop_q[:, 2:4], crop_k[:, 2:4])  # [N, 2]
    overlap_wh = (hi - lo).clamp(min=0)  # [N, 2]
    wh_q = crop_q[:, 2:4] - crop_q[:, 0:2]  # [N, 2]
    wh_k = crop_k[:, 2:4] - crop_k[:, 0:2]  # [N, 2]
    # One pixel covers wh / S of the source; the coarser view decides the smallest box.
    min_src_both = min_size * torch.maximum(wh_q, wh_k) / size  # [N, 2]
    valid = (overlap_wh >= min_src_both).all(dim=-1) & (
        overlap_wh.prod(dim=-1) >= min_overlap * wh_q.prod(dim=-1))  # [N]
    region = torch.where(valid[:, None], torch.cat([lo, hi], dim=-1), crop_q[:, :4])  # [N, 4]
    min_src = torch.where(valid[:, None], min_src_both, min_size * wh_q / size)  # [N, 2]
    return valid, region, min_src


def _box_sizes(u_area, u_aspect, area, aspect, size):
    """Width and height in pixels of a box covering ``area`` of an S x S view (uniform) with
    width / height log-uniform in ``aspect``. u_area, u_aspect: uniform [0, 1), any shape."""
    fraction = area[0] + u_area * (area[1] - area[0])
    ratio = torch.exp(math.log(aspect[0]) + u_aspect * (math.log(aspect[1]) - math.log(aspect[0])))
    return size * torch.sqrt(fraction * ratio), size * torch.sqrt(fraction / ratio)


def _negatives(positive, u, size, area, aspect, min_size, max_iou):
    """[N, M, 4] key-view boxes from ``u [N, M, T, 4]``: T candidates per negative, then the first
    with IoU <= max_iou with the positive is kept (rejection sampling, batched), else the least
    overlapping one. Keeping the first accepted candidate keeps the accepted-box distribution."""
    w, h = _box_sizes(u[..., 0], u[..., 1], area, aspect, size)  # [N, M, T] each
    w, h = w.clamp(min_size, size), h.clamp(min_size, size)
    x0, y0 = u[..., 2] * (size - w), u[..., 3] * (size - h)  # [N, M, T] each
    candidates = torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)  # [N, M, T, 4]
    if max_iou is None:
        return candidates[:, :, 0]  # [N, M, 4]
    iou = _pairwise_iou(candidates, positive[:, None, None])  # [N, M, T]
    pick = _pick_candidates(iou, max_iou)  # [N, M]
    index = pick[..., None, None].expand(-1, -1, 1, 4)  # [N, M, 1, 4]
    return candidates.gather(2, index).squeeze(2)  # [N, M, 4]


def _pick_candidates(iou: torch.Tensor, max_iou: float) -> torch.Tensor:
    """iou [..., T] -> index [...] of the first candidate with iou <= max_iou, else of the smallest iou."""
    accept = iou <= max_iou  # [..., T]
    first = accept.to(torch.uint8).argmax(dim=-1)  # argmax returns the first maximum
    return torch.where(accept.any(dim=-1), first, iou.argmin(dim=-1))


def _pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes [..., 4] xyxy, element-wise with broadcasting -> [...]."""
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter).clamp(min=torch.finfo(a.dtype).tiny)


def _mirror(u0, u1, flipped, size):
    """Horizontal flip of box x-coordinates where ``flipped`` is set (u -> S - u, then swap)."""
    flip = flipped > 0.5
    return torch.where(flip, size - u1, u0), torch.where(flip, size - u0, u1)


def _crop_for(boxes: torch.Tensor, crop: torch.Tensor, name: str) -> torch.Tensor:
    """Check shapes and broadcast crop [N, 5] against boxes [N, 4] or [N, L, 4]."""
    if boxes.dim() not in (2, 3) or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] or [N, L, 4], got {list(boxes.shape)}")
    if crop.dim() != 2 or crop.shape[1] != 5 or crop.shape[0] != boxes.shape[0]:
        raise ValueError(f"crop must have shape [{boxes.shape[0]}, 5], got {list(crop.shape)}")
    return crop[:, None] if boxes.dim() == 3 else crop


def _check_inputs(crop_q, crop_k, image_size, num_negatives, generator, area, aspect, min_size,
                  min_overlap, negative_max_iou, tries, check_values):
    """Raise ValueError naming the first bad argument."""
    for name, crop in (("crop_q", crop_q), ("crop_k", crop_k)):
        if not isinstance(crop, torch.Tensor) or crop.dim() != 2 or crop.shape[1] != 5:
            raise ValueError(f"{name} must be a tensor of shape [N, 5], got {_describe(crop)}")
        if crop.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be float32 or float64, got {crop.dtype}")
    if crop_k.shape != crop_q.shape or crop_k.dtype != crop_q.dtype or crop_k.device != crop_q.device:
        raise ValueError(f"crop_k must match crop_q in shape, dtype and device, got "
                         f"{_describe(crop_k)} vs {_describe(crop_q)}")
    _check_number("min_size", min_size, low=0.0, strict=True)
    _check_int("image_size", image_size, low=min_size)
    _check_int("num_negatives", num_negatives, low=0)
    _check_int("tries", tries, low=1)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator)}")
        if not _same_device(generator.device, crop_q.device):
            raise ValueError(f"generator is on {generator.device} but the crops are on {crop_q.device}")
    _check_range("area", area, low=0.0, high=1.0)
    _check_range("aspect", aspect, low=0.0, high=math.inf)
    _check_number("min_overlap", min_overlap, low=0.0, high=1.0)
    if negative_max_iou is not None:
        _check_number("negative_max_iou", negative_max_iou, low=0.0, high=1.0)
    if check_values:
        for name, crop in (("crop_q", crop_q), ("crop_k", crop_k)):
            _check_crop_values(name, crop)


def _check_crop_values(name: str, crop: torch.Tensor) -> None:
    # One host sync for all four flags rather than one per check.
    finite, in_unit, ordered, flag = torch.stack([
        torch.isfinite(crop).all(),
        ((crop[:, :4] >= 0) & (crop[:, :4] <= 1)).all(),
        ((crop[:, 2:4] - crop[:, 0:2]) > 0).all(),
        ((crop[:, 4] == 0) | (crop[:, 4] == 1)).all(),
    ]).tolist()
    if not finite:
        raise ValueError(f"{name} has non-finite values")
    if not in_unit:
        raise ValueError(f"{name} coordinates must lie in [0, 1] (source-image fractions)")
    if not ordered:
        raise ValueError(f"{name} must have x1 > x0 and y1 > y0")
    if not flag:
        raise ValueError(f"{name} flipped column must be 0 or 1")


def _check_int(name, value, low):
    # operator.index accepts int-likes (numpy ints) and rejects floats; bool is an int but a mistake here.
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= low
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_number(name, value, low=-math.inf, high=math.inf, strict=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > low if strict else value >= low) or value > high:
        bound = f"> {low}" if strict else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_range(name, pair, low, high):
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
    if not ok or not (low < pair[0] <= pair[1] <= high):
        raise ValueError(f"{name} must be a pair (low, high) with {low} < low <= high <= {high}, "
                         f"got {pair!r}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    # A generator made with torch.Generator("cuda") reports the current device index.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {list(x.shape)} {x.dtype} on {x.device}"
    return type(x).__name__
