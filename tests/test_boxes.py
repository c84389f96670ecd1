"""maskco.boxes: crop windows -> masked box, positive and negatives (docs/DESIGN.md 4.2)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from maskco.boxes import (NEGATIVE_TRIES, BoxSample, _pairwise_iou, _pick_candidates, boxes_from_uniforms,
                          draw_uniforms, sample_boxes, source_to_view, view_to_source)
from geometry import assert_same_source_region, coordinate_image, cut_view, pixel_crops

FAST = settings(max_examples=60, deadline=None)
EPS = 1e-3  # pixels: float32 rounding of coordinates mapped through a crop


@st.composite
def crop_rows(draw, n):
    """float32 [n, 5] crops: x0, y0, x1, y1 with sides >= 0.02, flipped 0/1."""
    rows = []
    for _ in range(n):
        x0, y0 = draw(st.floats(0, 0.98)), draw(st.floats(0, 0.98))
        x1, y1 = x0 + draw(st.floats(0.02, 1 - x0)), y0 + draw(st.floats(0.02, 1 - y0))
        rows.append([x0, y0, min(x1, 1.0), min(y1, 1.0), float(draw(st.booleans()))])
    return torch.tensor(rows, dtype=torch.float32)


@st.composite
def crop_pairs(draw, n_max=6):
    """(crop_q, crop_k), sometimes the same window (possibly mirrored), so overlaps run from none to full."""
    n = draw(st.integers(1, n_max))
    crop_q, crop_k = draw(crop_rows(n)), draw(crop_rows(n))
    same = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    crop_k[same, :4] = crop_q[same, :4]
    return crop_q, crop_k


def random_boxes(shape, size, seed):
    """float32 [*shape, 4] xyxy boxes inside an S x S view."""
    u = torch.rand(*shape, 4, generator=torch.Generator().manual_seed(seed)) * size
    lo, hi = torch.minimum(u[..., :2], u[..., 2:]), torch.maximum(u[..., :2], u[..., 2:])
    return torch.cat([lo, hi], dim=-1)


def sample(crop_q, crop_k, size, seed=0, num_negatives=16, negative_max_iou=0.5, tries=NEGATIVE_TRIES, **kwargs):
    """The step's path (method.draw_noise, method.inputs_from_noise): draw_uniforms, then boxes_from_uniforms."""
    generator = torch.Generator(crop_q.device).manual_seed(seed)
    u_box, u_negatives = draw_uniforms(crop_q.shape[0], num_negatives, negative_max_iou, generator, crop_q.device,
                                       crop_q.dtype, tries)
    return boxes_from_uniforms(crop_q, crop_k, size, u_box, u_negatives, negative_max_iou=negative_max_iou, **kwargs)


def sides(boxes):
    return boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]


# ---- coordinate maps

@FAST
@given(size=st.integers(16, 512), seed=st.integers(0, 2**31))
def test_identity_crop_is_identity(size, seed):
    boxes = random_boxes((3, 5), size, seed)  # [3, 5, 4]
    crop = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).expand(3, 5)
    torch.testing.assert_close(view_to_source(boxes, crop, size), boxes / size)
    torch.testing.assert_close(source_to_view(boxes / size, crop, size), boxes)
    torch.testing.assert_close(view_to_source(boxes[:, 0], crop, size), boxes[:, 0] / size)


@FAST
@given(crops=crop_rows(4), size=st.integers(16, 512), seed=st.integers(0, 2**31))
def test_flipping_twice_is_identity(crops, size, seed):
    boxes = random_boxes((4, 3), size, seed)  # [4, 3, 4]
    toggled = crops.clone()
    toggled[:, 4] = 1 - toggled[:, 4]
    mirrored = source_to_view(view_to_source(boxes, crops, size), toggled, size)
    expected = torch.stack([size - boxes[..., 2], boxes[..., 1], size - boxes[..., 0], boxes[..., 3]], -1)
    torch.testing.assert_close(mirrored, expected, atol=EPS, rtol=0)
    twice = source_to_view(view_to_source(mirrored, toggled, size), crops, size)
    torch.testing.assert_close(twice, boxes, atol=EPS, rtol=0)


@FAST
@given(crops=crop_rows(4), size=st.integers(16, 512), seed=st.integers(0, 2**31))
def test_view_to_source_inverts_source_to_view(crops, size, seed):
    boxes = random_boxes((4, 2), size, seed)
    torch.testing.assert_close(source_to_view(view_to_source(boxes, crops, size), crops, size), boxes,
                               atol=EPS, rtol=0)


# ---- the masked box and the positive

@FAST
@given(pair=crop_pairs(), size=st.integers(16, 256), m=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_boxes_are_well_formed_and_inside_both_views(pair, size, m, seed):
    crop_q, crop_k = pair
    out = sample(crop_q, crop_k, size, seed, num_negatives=m)
    n = crop_q.shape[0]
    assert isinstance(out, BoxSample)
    assert out.masked.shape == (n, 4) and out.keys.shape == (n, 1 + m, 4) and out.valid.shape == (n,)
    assert out.masked.dtype == out.keys.dtype == torch.float32 and out.valid.dtype == torch.bool
    for boxes in (out.masked, out.keys):
        assert torch.isfinite(boxes).all()
        assert (boxes >= 0).all() and (boxes <= size).all()
        w, h = sides(boxes)
        assert (w > 0).all() and (h > 0).all()


@FAST
@given(pair=crop_pairs(), size=st.integers(32, 256), seed=st.integers(0, 2**31))
def test_positive_maps_back_to_the_masked_source_box(pair, size, seed):
    crop_q, crop_k = pair
    out = sample(crop_q, crop_k, size, seed)
    src_q = view_to_source(out.masked, crop_q, size)[out.valid]  # [V, 4]
    src_k = view_to_source(out.keys[:, 0], crop_k, size)[out.valid]
    torch.testing.assert_close(src_q, src_k, atol=1e-5, rtol=0)
    overlap = torch.cat([torch.maximum(crop_q[:, :2], crop_k[:, :2]),
                         torch.minimum(crop_q[:, 2:4], crop_k[:, 2:4])], dim=-1)[out.valid]
    assert (src_q[:, :2] >= overlap[:, :2] - 1e-6).all() and (src_q[:, 2:] <= overlap[:, 2:] + 1e-6).all()
    for boxes in (out.masked, out.keys[:, 0]):  # >= min_size on a side in both views
        w, h = sides(boxes[out.valid])
        assert (w >= 16 - EPS).all() and (h >= 16 - EPS).all()


@FAST
@given(pair=crop_pairs(), size=st.integers(16, 256), seed=st.integers(0, 2**31))
def test_identical_crops_give_the_masked_box_as_positive(pair, size, seed):
    crop_q, _ = pair
    out = sample(crop_q, crop_q.clone(), size, seed)
    assert out.valid.all()
    torch.testing.assert_close(out.keys[:, 0], out.masked, atol=EPS, rtol=0)


@FAST
@given(pair=crop_pairs(), size=st.integers(16, 256), min_size=st.sampled_from([4.0, 16.0]),
       min_overlap=st.sampled_from([0.0, 0.04, 0.3]))
def test_valid_is_false_exactly_when_the_overlap_cannot_hold_a_box(pair, size, min_size, min_overlap):
    crop_q, crop_k = (c.double() for c in pair)  # reference in float64, compared away from the boundary
    out = sample(*pair, size, min_size=min_size, min_overlap=min_overlap)
    overlap = (torch.minimum(crop_q[:, 2:4], crop_k[:, 2:4]) -
               torch.maximum(crop_q[:, :2], crop_k[:, :2])).clamp(min=0)  # [N, 2]
    px_q = overlap * size / (crop_q[:, 2:4] - crop_q[:, :2])  # [N, 2] overlap sides in query pixels
    px_k = overlap * size / (crop_k[:, 2:4] - crop_k[:, :2])
    fraction = overlap.prod(-1) / (crop_q[:, 2:4] - crop_q[:, :2]).prod(-1)
    margins = torch.cat([px_q - min_size, px_k - min_size, (fraction - min_overlap)[:, None] * size], 1)
    expected = (margins >= 0).all(-1)
    clear = (margins.abs() > 1e-3).all(-1)  # float32 vs float64 may disagree exactly at the boundary
    assert torch.equal(out.valid[clear], expected[clear])


def test_no_overlap_is_invalid_but_well_formed():
    crop_q = torch.tensor([[0.0, 0.0, 0.4, 0.4, 0.0], [0.0, 0.0, 0.5, 0.5, 1.0]])
    crop_k = torch.tensor([[0.6, 0.6, 1.0, 1.0, 1.0], [0.45, 0.0, 1.0, 0.5, 0.0]])  # none; a sliver
    out = sample(crop_q, crop_k, 64, num_negatives=3)
    assert not out.valid.any()
    torch.testing.assert_close(out.keys[:, 0], out.masked)
    assert (out.masked >= 0).all() and (out.masked <= 64).all()


def test_masked_and_negative_sizes_follow_the_distribution():
    n, size = 2000, 224
    crop = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).expand(n, 5)
    out = sample(crop, crop, size, num_negatives=4)
    for boxes in (out.masked, out.keys[:, 1:].reshape(-1, 4)):
        w, h = sides(boxes)
        fraction, log_aspect = w * h / size**2, torch.log(w / h)
        assert fraction.min() >= 0.04 - 1e-4 and fraction.max() <= 0.25 + 1e-4
        assert log_aspect.abs().max() <= math.log(2) + 1e-4
        assert abs(log_aspect.mean().item()) < 0.05
    fraction = (lambda w, h: w * h / size**2)(*sides(out.masked))
    assert abs(fraction.mean().item() - 0.145) < 0.006  # uniform in [0.04, 0.25]; 4 standard errors


# ---- negatives

@FAST
@given(pair=crop_pairs(), size=st.integers(64, 256), m=st.integers(1, 8),
       max_iou=st.sampled_from([0.3, 0.5, 0.7]), seed=st.integers(0, 2**31))
def test_negatives_respect_the_iou_limit_and_size(pair, size, m, max_iou, seed):
    crop_q, crop_k = pair
    out = sample(crop_q, crop_k, size, seed, num_negatives=m, negative_max_iou=max_iou, tries=64)
    negatives, positive = out.keys[:, 1:], out.keys[:, :1]  # [N, M, 4], [N, 1, 4]
    w, h = sides(negatives)
    assert (w >= 16 - EPS).all() and (h >= 16 - EPS).all() and (w <= size).all() and (h <= size).all()
    assert (negatives >= 0).all() and (negatives <= size).all()
    assert (_pairwise_iou(negatives, positive) <= max_iou + 1e-6).all()


def test_pick_candidates_takes_the_first_accepted_else_the_least_overlapping():
    iou = torch.tensor([[0.9, 0.4, 0.1], [0.8, 0.6, 0.7], [0.5, 0.2, 0.9]])
    assert _pick_candidates(iou, 0.5).tolist() == [1, 1, 0]
    assert _pick_candidates(iou, 0.0).tolist() == [2, 1, 1]


def test_no_iou_limit_and_no_negatives():
    crop = torch.tensor([[0.1, 0.1, 0.9, 0.8, 1.0]] * 3)
    assert sample(crop, crop, 64, num_negatives=0).keys.shape == (3, 1, 4)
    out = sample(crop, crop, 64, num_negatives=5, negative_max_iou=None)
    assert out.keys.shape == (3, 6, 4) and (sides(out.keys)[0] >= 16 - EPS).all()
    empty = sample(crop[:0], crop[:0], 64)
    assert empty.masked.shape == (0, 4) and empty.keys.shape == (0, 17, 4)


def test_same_seed_same_boxes_and_other_seed_other_boxes():
    crop_q = pixel_crops(32, 100, 120, torch.Generator().manual_seed(1))
    crop_k = pixel_crops(32, 100, 120, torch.Generator().manual_seed(2))
    a, b, c = (sample(crop_q, crop_k, 64, seed) for seed in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.masked, c.masked) and not torch.equal(a.keys, c.keys)


@pytest.mark.parametrize("options", [{}, dict(num_negatives=3, min_size=8.0, min_overlap=0.1),
                                     dict(negative_max_iou=None), dict(tries=4, negative_max_iou=0.3, area=(0.1, 0.2))])
def test_sample_boxes_is_draw_uniforms_then_boxes_from_uniforms(options):
    """The convenience wrapper draws what the step draws, in the same order: the same boxes."""
    crop_q = pixel_crops(32, 100, 120, torch.Generator().manual_seed(1))
    crop_k = pixel_crops(32, 100, 120, torch.Generator().manual_seed(2))
    for dtype in (torch.float32, torch.float64):
        cq, ck = crop_q.to(dtype), crop_k.to(dtype)
        wrapped = sample_boxes(cq, ck, 64, generator=torch.Generator().manual_seed(7), **options)
        pure = sample(cq, ck, 64, 7, **options)
        assert all(torch.equal(a, b) for a, b in zip(wrapped, pure))


# ---- pixels: the masked box and its positive show the same part of the image

def test_views_of_a_coordinate_image_show_the_same_source_region():
    image = coordinate_image(160, 224)  # H != W catches swapped axes
    g = torch.Generator().manual_seed(0)
    crop_q, crop_k = pixel_crops(24, 160, 224, g), pixel_crops(24, 160, 224, g)
    view_q = torch.stack([cut_view(image, c, 64) for c in crop_q])  # [N, 3, 64, 64]
    view_k = torch.stack([cut_view(image, c, 64) for c in crop_k])
    out = sample(crop_q, crop_k, 64, num_negatives=0)
    assert out.valid.sum() >= 12
    assert_same_source_region(view_q, view_k, out.masked, out.keys[:, 0], valid=out.valid)
    shifted = out.keys[:, 0] + torch.tensor([4.0, 0.0, 4.0, 0.0])  # a few pixels off must be caught
    with pytest.raises(AssertionError, match="different source regions"):
        assert_same_source_region(view_q, view_k, out.masked, shifted, valid=out.valid)


def test_cut_view_matches_the_crop_convention():
    image = coordinate_image(128, 192)
    view = cut_view(image, torch.tensor([0.25, 0.5, 0.75, 1.0, 1.0]), 32)  # flipped: x runs 0.75 -> 0.25
    x, y = view[0].float() / 255, view[1].float() / 255
    assert abs(x[:, 0].mean() - (0.75 - 0.25 / 64)) < 0.01 and abs(x[:, -1].mean() - (0.25 + 0.25 / 64)) < 0.01
    assert abs(y[0].mean() - (0.5 + 0.25 / 64)) < 0.01 and abs(y[-1].mean() - (1.0 - 0.25 / 64)) < 0.01
    with pytest.raises(ValueError, match="pixel grid"):
        cut_view(image, [0.2501, 0.5, 0.75, 1.0, 0.0], 32)


# ---- bad input

GOOD = dict(crop_q=torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]), crop_k=torch.tensor([[0.2, 0.2, 0.9, 0.9, 1.0]]),
            image_size=64)


@pytest.mark.parametrize("name, value", [
    ("crop_q", torch.zeros(2, 4)),
    ("crop_q", [[0.0, 0.0, 1.0, 1.0, 0.0]]),
    ("crop_q", torch.tensor([[0, 0, 1, 1, 0]])),
    ("crop_q", torch.tensor([[0.5, 0.0, 0.4, 1.0, 0.0]])),  # x1 < x0
    ("crop_q", torch.tensor([[0.0, 0.0, 1.2, 1.0, 0.0]])),  # outside [0, 1]
    ("crop_q", torch.tensor([[0.0, float("nan"), 1.0, 1.0, 0.0]])),
    ("crop_q", torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.5]])),  # flipped not 0/1
    ("crop_k", torch.zeros(2, 5)),
    ("crop_k", torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)),
    ("crop_k", torch.tensor([[0.0, 0.0, 1.0, float("inf"), 0.0]])),
    ("image_size", 8),
    ("image_size", 64.0),
    ("num_negatives", -1),
    ("generator", 0),
    ("area", (0.3, 0.2)),
    ("area", (0.0, 0.2)),
    ("aspect", (2.0,)),
    ("min_size", 0.0),
    ("min_overlap", 1.5),
    ("negative_max_iou", float("nan")),
    ("tries", 0),
])
def test_bad_input_raises_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        sample_boxes(**{**GOOD, name: value})


def test_generator_on_another_device_is_rejected():
    crop = torch.zeros(2, 5, device="meta")
    with pytest.raises(ValueError, match="generator"):
        sample_boxes(crop, crop, 64, generator=torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_boxes_match_the_properties():
    g = torch.Generator().manual_seed(0)
    crop_q, crop_k = pixel_crops(256, 200, 300, g).cuda(), pixel_crops(256, 200, 300, g).cuda()
    a, b = sample(crop_q, crop_k, 224, seed=3), sample(crop_q, crop_k, 224, seed=3)
    assert a.masked.is_cuda and all(torch.equal(x, y) for x, y in zip(a, b))
    reference = sample(crop_q.cpu(), crop_k.cpu(), 224)  # other random stream: same validity
    assert torch.equal(a.valid.cpu(), reference.valid)
    torch.testing.assert_close(view_to_source(a.masked, crop_q, 224)[a.valid],
                               view_to_source(a.keys[:, 0], crop_k, 224)[a.valid], atol=1e-5, rtol=0)
    assert (_pairwise_iou(a.keys[:, 1:], a.keys[:, :1]) <= 0.5 + 1e-6).all()
