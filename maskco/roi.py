"""Fused RoI-align + average pool: the region features the MaskCo head consumes.

The head only needs the *mean* of each ``roi_align`` output (docs/DESIGN.md 4.5). torchvision's bilinear
sampling is separable: its out-of-range test (a sample outside [-1, H] x [-1, W] counts as zero) and
its clamping (``y <= 0 -> 0``, ``y_low >= H - 1 -> H - 1``) act on y and x independently, and every
box samples a regular (pooled * grid_h) x (pooled * grid_w) lattice. So the average over a box's
samples is ``wy^T F wx``, with ``wy [H]`` / ``wx [W]`` the averaged 1-D interpolation weights, and a
batch of boxes is one batched matmul ``[N, L, H*W] x [N, H*W, C] -> [N, L, C]``. Autograd gives the
backward; no ``[N*L, C, 7, 7]`` tensor is ever built.

``roi_pool_reference`` is the torchvision path it is tested against.
"""
import torch
import torchvision


def _check_inputs(features, boxes, spatial_scale, validate_boxes):
    if features.dim() != 4 or not features.is_floating_point():
        raise ValueError(f"features must be a floating [N, C, H, W] tensor, "
                         f"got {features.dtype} {tuple(features.shape)}")
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"boxes must be [N, L, 4] with N = features.shape[0] = {features.shape[0]}, "
                         f"got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"boxes must be floating point, got {boxes.dtype}")
    if not spatial_scale > 0:  # also rejects NaN
        raise ValueError(f"spatial_scale must be > 0, got {spatial_scale}")
    # Value checks read the tensor on the host: a sync on an accelerator, hence the opt-out.
    if validate_boxes and boxes.numel():
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError("boxes must be finite (found NaN or inf)")
        if bool((boxes[..., 2] < boxes[..., 0]).any() | (boxes[..., 3] < boxes[..., 1]).any()):
            raise ValueError("boxes must be xyxy with x1 >= x0 and y1 >= y0")


def _pair(output_size):
    pooled = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(pooled) != 2 or not all(isinstance(p, int) and p > 0 for p in pooled):
        raise ValueError(f"output_size must be a positive int or (h, w) pair, got {output_size}")
    return pooled


def axis_weights(lo, hi, size, pooled, sampling_ratio, aligned, spatial_scale):
    """Averaged 1-D bilinear weights of ``roi_align`` along one axis.

    ``lo``, ``hi`` ``[B]`` box edges in input pixels -> ``[B, size]``: entry ``s`` is the mean over
    the box's ``pooled * grid`` samples of the weight each gives feature row/column ``s``. The
    arithmetic copies torchvision's CPU kernel op for op (same dtype, same order), so the sample
    coordinates are bitwise equal and the out-of-range test flips on exactly the same samples.
    """
    offset = 0.5 if aligned else 0.0
    start = lo * spatial_scale - offset  # [B]
    extent = (hi * spatial_scale - offset) - start  # [B]
    if not aligned:
        extent = extent.clamp_min(1.0)  # torchvision forces malformed RoIs to 1x1
    bin_size = extent / pooled  # [B]
    if sampling_ratio > 0:
        grid = torch.full_like(bin_size, sampling_ratio)  # [B]
        num_samples = pooled * sampling_ratio
        first = torch.zeros_like(bin_size, dtype=torch.long)  # [B]
    else:
        # Adaptive: ceil(extent / pooled) samples per bin, different for every box. Sizing a tensor
        # by the largest grid would need a host sync, so instead look at a fixed-size window of the
        # box's samples that starts just before the first one at y >= -1. For grid >= 2 the sample
        # step extent / (pooled * grid) exceeds 1/2, so at most 2 * (size + 1) + 1 samples land in
        # [-1, size]; every other sample is out of range and weighs zero. For grid == 1 the window
        # holds all `pooled` samples. Two samples of slack cover rounding in `first`.
        grid = torch.ceil(bin_size)  # [B]; torchvision's ceil(roi_height / pooled_height)
        num_samples = max(pooled, 2 * size + 6)
        step = bin_size / grid.clamp_min(1.0)  # [B]
        k_first = torch.where(step > 0, (-1.0 - start) / step - 0.5, 0.0).floor() - 1  # [B]
        first = torch.nan_to_num(k_first).clamp(min=0).clamp(max=pooled * grid).long()  # [B]
    grid_long = grid.long().clamp_min(1)  # [B]
    k = first[:, None] + torch.arange(num_samples, device=lo.device)  # [B, P] sample index in box
    pos = (k // grid_long[:, None]).to(lo.dtype)  # [B, P] bin (ph)
    sub = (k % grid_long[:, None]).to(lo.dtype)  # [B, P] sample inside the bin (iy)
    # yy = roi_start + ph * bin_size + (iy + .5) * bin_size / grid, evaluated left to right.
    y = start[:, None] + pos * bin_size[:, None] + (sub + 0.5) * bin_size[:, None] / grid[:, None]  # [B, P]
    inside = (k < pooled * grid_long[:, None]) & (grid[:, None] > 0) & (y >= -1.0) & (y <= size)  # [B, P]
    y = torch.where(inside, y, 0.0).clamp_min(0.0)  # [B, P]
    low = y.floor()  # [B, P]; y >= 0, so floor == the C++ (int) cast
    at_edge = low >= size - 1  # [B, P]
    low = torch.where(at_edge, float(size - 1), low)  # [B, P]
    y = torch.where(at_edge, low, y)  # [B, P]
    high = torch.where(at_edge, low, low + 1)  # [B, P]
    frac = y - low  # [B, P]
    w_low = torch.where(inside, 1.0 - frac, 0.0)  # [B, P]
    w_high = torch.where(inside, frac, 0.0)  # [B, P]
    cells = torch.arange(size, device=lo.device, dtype=lo.dtype)  # [S]
    # One-hot accumulation (not scatter_add): deterministic on every device, and [B, P, S] is small.
    weights = ((low[..., None] == cells) * w_low[..., None]
               + (high[..., None] == cells) * w_high[..., None]).sum(1)  # [B, S]
    return weights / (pooled * grid.clamp_min(1.0))[:, None]  # [B, S]


def roi_pool(features, boxes, spatial_scale, sampling_ratio, aligned=True, output_size=7, validate_boxes=True):
    """Mean of ``roi_align`` over its output grid, as one batched matmul.

    features ``[N, C, H, W]`` (any memory format; channels_last is read without a copy),
    boxes ``[N, L, 4]`` xyxy in input-image pixels, row n belonging to image n
    -> ``[N, L, C]`` in ``features.dtype`` (a transposed view for NCHW features), equal to
    ``roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned).mean((2, 3))``.

    ``sampling_ratio <= 0`` is torchvision's adaptive grid (``ceil(roi_size / output_size)`` per box).
    Boxes get no gradient (as in torchvision). ``validate_boxes=False`` skips the value checks
    (finite, x1 >= x0, y1 >= y0), which cost a host sync on an accelerator; the trainer's boxes come
    from ``maskco.boxes`` and need none.
    """
    _check_inputs(features, boxes, spatial_scale, validate_boxes)
    pooled_h, pooled_w = _pair(output_size)
    n, c, h, w = features.shape
    num_boxes = boxes.shape[1]
    # Weights in the dtype torchvision would compute coordinates in (fp32 for half types).
    work = torch.float64 if features.dtype == torch.float64 else torch.float32
    flat = boxes.detach().to(work).reshape(n * num_boxes, 4)  # [N*L, 4]
    common = dict(sampling_ratio=sampling_ratio, aligned=aligned, spatial_scale=spatial_scale)
    if h == w and pooled_h == pooled_w:
        # Both axes in one call: the weights are ~50 tiny ops, launch-bound on a GPU.
        lo, hi = flat[:, [1, 0]].T.reshape(-1), flat[:, [3, 2]].T.reshape(-1)  # [2*N*L] y edges, then x
        wy, wx = axis_weights(lo, hi, h, pooled_h, **common).chunk(2)  # [N*L, H], [N*L, W]
    else:
        wy = axis_weights(flat[:, 1], flat[:, 3], h, pooled_h, **common)  # [N*L, H]
        wx = axis_weights(flat[:, 0], flat[:, 2], w, pooled_w, **common)  # [N*L, W]
    weights = (wy[:, :, None] * wx[:, None, :]).reshape(n, num_boxes, h * w).to(features.dtype)  # [N, L, H*W]
    # Contract in the features' own layout, so neither pass copies the map: measured on CPU, a
    # transposed operand in the large dimension makes the NCHW matmul (fwd + bwd) about 1.5x slower.
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        values = features.permute(0, 2, 3, 1).reshape(n, h * w, c)  # [N, H*W, C], a view
        return torch.bmm(weights, values)  # [N, L, C]
    values = features.reshape(n, c, h * w)  # [N, C, H*W], a view when contiguous
    return torch.bmm(values, weights.transpose(1, 2)).transpose(1, 2)  # [N, L, C], a transposed view


def roi_pool_reference(features, boxes, spatial_scale, sampling_ratio, aligned=True, output_size=7,
                       validate_boxes=True):
    """The torchvision path ``roi_pool`` must equal: ``roi_align(...).mean((2, 3))`` -> ``[N, L, C]``."""
    _check_inputs(features, boxes, spatial_scale, validate_boxes)
    pooled = _pair(output_size)
    n, num_boxes = boxes.shape[:2]
    rois = list(boxes.detach().to(features.dtype))  # one [L, 4] per image -> batch index n
    pooled_maps = torchvision.ops.roi_align(
        features, rois, pooled, spatial_scale, sampling_ratio, aligned)  # [N*L, C, h, w]
    return pooled_maps.mean((2, 3)).reshape(n, num_boxes, features.shape[1])  # [N, L, C]
