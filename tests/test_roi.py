"""maskco.roi: the fused RoI-align-pool equals torchvision roi_align(...).mean((2, 3)) (docs/DESIGN.md 4.5)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from maskco.roi import roi_pool, roi_pool_reference

FAST = settings(max_examples=25, deadline=None)
SAMPLING = (1, 2, -1)


def mixed_boxes(n, num_boxes, image_size, seed, dtype=torch.float32):
    """[n, num_boxes, 4] xyxy input-pixel boxes: a mix of ordinary, tiny (down to zero size), huge,
    partly outside and wholly outside an image_size x image_size image."""
    gen = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, num_boxes, 2, generator=gen, dtype=dtype) * 1.6 * image_size - 0.3 * image_size
    side = torch.rand(n, num_boxes, 2, generator=gen, dtype=dtype) * image_size  # [n, L, 2]
    kind = torch.randint(0, 5, (n, num_boxes, 1), generator=gen)  # [n, L, 1]
    side = torch.where(kind == 1, side * 0.02, side)  # tiny, well under one feature cell
    side = torch.where(kind == 2, side * 20, side)  # huge: many adaptive samples per bin
    side = torch.where(kind == 3, torch.zeros_like(side), side)  # zero width and height
    corner = torch.where(kind == 4, corner + 3 * image_size, corner)  # wholly outside
    return torch.cat([corner, corner + side], dim=-1)  # [n, L, 4]


def check_pool(features, boxes, scale, sampling_ratio, aligned, atol, output_size=7):
    """Forward and features-gradient of roi_pool against the reference on the same inputs."""
    grad_out = torch.randn(*boxes.shape[:2], features.shape[1], dtype=features.dtype, device=features.device)
    leaf_fused = features.detach().clone().requires_grad_()
    leaf_ref = features.detach().clone().requires_grad_()
    fused = roi_pool(leaf_fused, boxes, scale, sampling_ratio, aligned, output_size)  # [N, L, C]
    ref = roi_pool_reference(leaf_ref, boxes, scale, sampling_ratio, aligned, output_size)  # [N, L, C]
    assert fused.shape == ref.shape == (*boxes.shape[:2], features.shape[1])
    torch.testing.assert_close(fused, ref, atol=atol, rtol=0)
    (fused * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(leaf_fused.grad, leaf_ref.grad, atol=atol, rtol=0)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", SAMPLING)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torchvision_fp32(aligned, sampling_ratio, channels_last):
    torch.manual_seed(0)
    features = torch.randn(3, 8, 7, 9)  # [N, C, H, W], not square to catch an H/W mix-up
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
    boxes = mixed_boxes(3, 40, image_size=224, seed=1)
    check_pool(features, boxes, 1 / 32, sampling_ratio, aligned, atol=1e-5)


@FAST
@given(n=st.integers(1, 3), c=st.integers(1, 6), h=st.integers(1, 12), w=st.integers(1, 12),
       num_boxes=st.integers(0, 9), stride=st.sampled_from([1, 4, 16, 32]),
       sampling_ratio=st.sampled_from([0, 1, 2, 3, -1]), aligned=st.booleans(),
       output_size=st.sampled_from([1, 3, 7, (2, 5)]), seed=st.integers(0, 2**16))
def test_matches_torchvision_float64_random_shapes(n, c, h, w, num_boxes, stride, sampling_ratio, aligned,
                                                   output_size, seed):
    torch.manual_seed(seed)
    features = torch.randn(n, c, h, w, dtype=torch.float64)
    boxes = mixed_boxes(n, num_boxes, image_size=max(h, w) * stride, seed=seed, dtype=torch.float64)
    check_pool(features, boxes, 1 / stride, sampling_ratio, aligned, atol=1e-12, output_size=output_size)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", SAMPLING)
def test_matches_torchvision_on_integer_boxes(aligned, sampling_ratio):
    """Integer boxes at stride 1 put samples exactly on y = -1, y = H and cell edges, where the
    out-of-range test and the clamping are discontinuous: the coordinates must round as torchvision's."""
    gen = torch.Generator().manual_seed(3)
    corner = torch.randint(-12, 12, (2, 300, 2), generator=gen).float()  # [2, L, 2]
    side = torch.randint(0, 24, (2, 300, 2), generator=gen).float()  # [2, L, 2]
    boxes = torch.cat([corner, corner + side], dim=-1)  # [2, L, 4]
    features = torch.randn(2, 3, 7, 7)
    check_pool(features, boxes, 1.0, sampling_ratio, aligned, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio", SAMPLING)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_close_to_fp32_reference(sampling_ratio, channels_last):
    """bf16 in, bf16 out; torchvision's CPU kernel has no bf16, so compare with the fp32 reference
    on the same (bf16-representable) values. bf16 keeps 8 bits: allow a few units in the last place."""
    torch.manual_seed(0)
    features = torch.randn(2, 16, 7, 7).bfloat16()
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
    boxes = mixed_boxes(2, 17, image_size=224, seed=5)
    leaf = features.detach().clone().requires_grad_()
    fused = roi_pool(leaf, boxes, 1 / 32, sampling_ratio)  # [N, L, C] bf16
    assert fused.dtype == torch.bfloat16
    ref_leaf = features.float().requires_grad_()
    ref = roi_pool_reference(ref_leaf, boxes, 1 / 32, sampling_ratio)  # [N, L, C] fp32
    torch.testing.assert_close(fused.float(), ref, atol=3e-2, rtol=2e-2)
    grad_out = torch.randn_like(ref)
    fused.backward(grad_out.bfloat16())
    ref.backward(grad_out)
    torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad, atol=3e-2, rtol=2e-2)


def test_channels_last_gradient_keeps_layout():
    """The channels_last path reads the map as a view, so its gradient comes back channels_last too."""
    features = torch.randn(2, 8, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    roi_pool(features, mixed_boxes(2, 5, 224, seed=0), 1 / 32, 2).sum().backward()
    assert features.grad.is_contiguous(memory_format=torch.channels_last)


def test_boxes_get_no_gradient_and_empty_box_lists_work():
    features = torch.randn(2, 4, 7, 7, requires_grad=True)
    boxes = mixed_boxes(2, 3, 224, seed=0).requires_grad_()
    roi_pool(features, boxes, 1 / 32, 2).sum().backward()
    assert boxes.grad is None and features.grad is not None
    empty = roi_pool(features, torch.zeros(2, 0, 4), 1 / 32, -1)
    assert empty.shape == (2, 0, 4)


def test_wholly_outside_boxes_pool_to_zero():
    features = torch.randn(1, 4, 7, 7)
    boxes = torch.tensor([[[300.0, 300.0, 400.0, 400.0], [-200.0, 0.0, -100.0, 50.0]]])  # [1, 2, 4]
    assert torch.equal(roi_pool(features, boxes, 1 / 32, -1), torch.zeros(1, 2, 4))


@pytest.mark.parametrize("features, boxes, kwargs, name", [
    (torch.randn(2, 4, 7), torch.zeros(2, 1, 4), {}, "features"),
    (torch.randn(2, 4, 7, 7), torch.zeros(3, 1, 4), {}, "boxes"),
    (torch.randn(2, 4, 7, 7), torch.zeros(2, 1, 5), {}, "boxes"),
    (torch.randn(2, 4, 7, 7), torch.tensor([[[0.0, 0.0, float("nan"), 1.0]]] * 2), {}, "boxes"),
    (torch.randn(2, 4, 7, 7), torch.tensor([[[5.0, 0.0, 1.0, 1.0]]] * 2), {}, "boxes"),
    (torch.randn(2, 4, 7, 7), torch.zeros(2, 1, 4), {"spatial_scale": 0.0}, "spatial_scale"),
    (torch.randn(2, 4, 7, 7), torch.zeros(2, 1, 4), {"output_size": 0}, "output_size"),
])
def test_bad_input_raises_value_error_naming_argument(features, boxes, kwargs, name):
    args = {"spatial_scale": 1 / 32, "sampling_ratio": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        roi_pool(features, boxes, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampling_ratio", SAMPLING)
def test_matches_torchvision_on_cuda(sampling_ratio):
    torch.manual_seed(0)
    features = torch.randn(4, 64, 7, 7, device="cuda").to(memory_format=torch.channels_last)
    boxes = mixed_boxes(4, 17, image_size=224, seed=2).cuda()
    # nvcc contracts the sample-coordinate arithmetic into FMAs, so a sample sitting exactly on a
    # discontinuity may round differently than here; random boxes make that vanishingly unlikely.
    check_pool(features, boxes, 1 / 32, sampling_ratio, True, atol=1e-5)
