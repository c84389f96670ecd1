"""maskco.augment: batched ops against a loop of torchvision calls, sampling, masking, views_from_params."""
import itertools

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from maskco import augment
from maskco.augment import PhotometricParams

N, S = 6, 24
TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _images(seed=0, n=N, size=S):
    """Random float images in [0, 1] [n, 3, size, size], with some ties and grey pixels mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, :, : size // 4] = (x[:, :, : size // 4] * 4).round() / 4  # equal channels: HSV tie rules
    x[:, :, -2:] = x[:, :1, -2:]  # grey rows: S = 0
    return x


def _params(n=N, **fields):
    """Identity PhotometricParams (jitter on, every factor neutral) with ``fields`` overridden."""
    base = dict(brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n),
                hue=torch.zeros(n), order=torch.arange(4).repeat(n, 1),
                jitter=torch.ones(n, dtype=torch.bool), grayscale=torch.zeros(n, dtype=torch.bool),
                blur=torch.zeros(n, dtype=torch.bool), sigma=torch.ones(n))
    base.update(fields)
    return PhotometricParams(**base)


def _tv_photometric(x, p, kernel_size):
    """Reference: per image, ColorJitter ops in p.order, RandomGrayscale, GaussianBlur (torchvision)."""
    out = []
    for i in range(x.shape[0]):
        y = x[i]
        factors = (p.brightness[i], p.contrast[i], p.saturation[i], p.hue[i])
        if p.jitter[i]:
            for op in p.order[i].tolist():
                y = TV_OPS[op](y, factors[op].item())
        if p.grayscale[i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if p.blur[i]:
            y = TF.gaussian_blur(y, [kernel_size] * 2, [p.sigma[i].item()] * 2)
        out.append(y)
    return torch.stack(out)


# ---- parity with torchvision, fixed parameters

@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blend_ops_match_torchvision(name):
    x = _images()
    factors = torch.tensor([0.0, 0.3, 0.6, 1.0, 1.4, 2.5])  # 0, identity and > 1 (clamping)
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(N)])  # [N, 4]
    out = augment.color_jitter(x, _params(order=order, **{name: factors}))
    op = getattr(TF, f"adjust_{name}")
    ref = torch.stack([op(x[i], factors[i].item()) for i in range(N)])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)  # float32 rounding (fused multiply-add)


def test_hue_matches_torchvision():
    # Same HSV model as torchvision, but HSV -> RGB by the closed form instead of the lookup table:
    # rounding differs by a few ulps of values in [0, 1]; 1e-5 leaves a wide margin.
    x = _images()
    hue = torch.tensor([-0.5, -0.23, -0.01, 0.0, 0.1, 0.5])
    ref = torch.stack([TF.adjust_hue(x[i], hue[i].item()) for i in range(N)])
    torch.testing.assert_close(augment.adjust_hue(x, hue), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(augment.color_jitter(x, _params(hue=hue)), ref, atol=1e-5, rtol=0)
    assert torch.equal(augment.adjust_hue(x, torch.zeros(N)), x)  # no round trip at hue 0


def test_grayscale_matches_torchvision():
    x = _images()
    ref = torch.stack([TF.rgb_to_grayscale(x[i], num_output_channels=1) for i in range(N)])
    torch.testing.assert_close(augment.rgb_to_grayscale(x), ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 9, 23])
def test_gaussian_blur_matches_torchvision(kernel_size):
    x = _images(size=32)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 3.3])
    ref = torch.stack([TF.gaussian_blur(image, [kernel_size] * 2, [s.item()] * 2)
                       for image, s in zip(x, sigma)])
    # separable (2 x 1-D) vs torchvision's 2-D kernel: the same sum of up to 23 x 23 float32 terms
    # in another order, so a few ulps apart
    torch.testing.assert_close(augment.gaussian_blur(x, sigma, kernel_size), ref, atol=3e-6, rtol=0)


def test_full_jitter_in_each_samples_order():
    n = 24
    x = _images(n=n)
    g = torch.Generator().manual_seed(1)
    p = augment.sample_photometric(n, g, "cpu", jitter_prob=0.9)
    p = p._replace(order=torch.tensor(list(itertools.permutations(range(4)))))  # all 24 orders
    jitter_only = p._replace(grayscale=torch.zeros_like(p.grayscale), blur=torch.zeros_like(p.blur))
    ref = _tv_photometric(x, jitter_only, kernel_size=3)
    torch.testing.assert_close(augment.color_jitter(x, p), ref, atol=1e-5, rtol=0)  # hue: see above


def test_apply_photometric_matches_torchvision_pipeline():
    n = 24
    g = torch.Generator().manual_seed(2)
    views = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    p = augment.sample_photometric(n, g, "cpu", gray_prob=0.3)
    for flag in (p.jitter, p.grayscale, p.blur):  # both branches of every random transform occur
        assert flag.any() and not flag.all()
    out = augment.apply_photometric(views, p, blur_kernel_size=5)
    ref = _tv_photometric(TF.to_dtype(views, torch.float32, scale=True), p, 5)
    assert out.dtype == torch.float32 and out.shape == views.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_normalize_matches_torchvision():
    x = _images()
    ref = TF.normalize(x, list(augment.IMAGENET_MEAN), list(augment.IMAGENET_STD))
    torch.testing.assert_close(augment.normalize(x), ref, atol=1e-6, rtol=0)


def test_default_blur_kernel_size():
    assert augment.default_blur_kernel_size(224) == 23  # MoCo v2 / SimCLR at 224 px
    assert augment.default_blur_kernel_size(96) == 9
    assert augment.default_blur_kernel_size(8) == 3
    assert all(augment.default_blur_kernel_size(s) % 2 == 1 for s in range(4, 512))


# ---- sampling

def test_sample_photometric_rates_and_ranges():
    n = 20000
    p = augment.sample_photometric(n, torch.Generator().manual_seed(0), "cpu")
    assert abs(p.jitter.float().mean() - 0.8) < 0.02
    assert abs(p.grayscale.float().mean() - 0.2) < 0.02
    assert abs(p.blur.float().mean() - 0.5) < 0.02
    for factor in (p.brightness, p.contrast, p.saturation):
        assert factor.min() >= 0.6 and factor.max() <= 1.4 and abs(factor.mean() - 1) < 0.01
    assert p.hue.min() >= -0.1 and p.hue.max() <= 0.1 and abs(p.hue.mean()) < 0.005
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    # order: a permutation per sample, each of the 24 about equally often
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    counts = torch.unique(p.order, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > n / 24 * 0.8 and counts.max() < n / 24 * 1.2


def test_sample_photometric_is_deterministic_given_the_seed():
    def draw(seed):
        return augment.sample_photometric(64, torch.Generator().manual_seed(seed), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(draw(3), draw(3)))
    assert not torch.equal(draw(3).brightness, draw(4).brightness)


def test_sample_photometric_factor_floor_is_zero():
    p = augment.sample_photometric(1000, torch.Generator().manual_seed(0), "cpu", jitter=(1.5, 0, 0, 0))
    assert p.brightness.min() >= 0 and p.brightness.max() <= 2.5
    assert torch.all(p.contrast == 1) and torch.all(p.hue == 0)


# ---- masking

def _box_mask_reference(boxes, h, w):
    """Loop reference of the pixel-centre rule: x0 <= j + 0.5 < x1 and y0 <= i + 0.5 < y1."""
    mask = torch.zeros(boxes.shape[0], 1, h, w, dtype=torch.bool)
    for n, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        for i in range(h):
            for j in range(w):
                mask[n, 0, i, j] = x0 <= j + 0.5 < x1 and y0 <= i + 0.5 < y1
    return mask


def _random_boxes(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(n, 2, 2, generator=g) * size * 1.2 - size * 0.1  # some past the edges
    lo, hi = corners.min(dim=1).values, corners.max(dim=1).values  # [n, 2] each
    return torch.cat([lo, hi], dim=1)  # [n, 4] xyxy, fractional


@pytest.mark.parametrize("mode", ["zero", "noise", "blur"])
def test_mask_writes_exactly_the_box(mode):
    x = torch.randn(N, 3, S, S)
    boxes = _random_boxes(N, S)
    inside = _box_mask_reference(boxes, S, S).expand_as(x)
    assert inside.any() and not inside.all()
    out = augment.mask_boxes(x, boxes, mode, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[~inside], x[~inside])
    if mode == "zero":
        assert torch.all(out[inside] == 0)
    elif mode == "noise":
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out[inside], noise[inside])
    else:
        kernel_size = augment.mask_blur_kernel_size(S)
        sigma = [augment.MASK_BLUR_SIGMA * S] * 2
        blurred = torch.stack([TF.gaussian_blur(x[i], [kernel_size] * 2, sigma) for i in range(N)])
        torch.testing.assert_close(out[inside], blurred[inside], atol=1e-5, rtol=0)
        assert out[inside].std() < 0.5 * x[inside].std()  # strongly blurred


def test_mask_fractional_boxes_follow_pixel_centres():
    x = torch.ones(2, 3, 6, 6)
    boxes = torch.tensor([[1.5, 0.2, 3.5, 2.6],  # cols 1, 2 (centre 3.5 is the open end); rows 0..2
                          [0.6, 4.5, 1.4, 6.0]])  # no column centre in [0.6, 1.4): empty
    out = augment.mask_boxes(x, boxes, "zero")
    expected = torch.ones(2, 6, 6)
    expected[0, 0:3, 1:3] = 0
    assert torch.equal(out[:, 0], expected) and torch.equal(out[:, 1], expected)


def test_mask_none_changes_nothing():
    x = torch.randn(N, 3, S, S)
    assert torch.equal(augment.mask_boxes(x, _random_boxes(N, S), "none"), x)


# ---- views_from_params (what the step runs, given the draws of method.draw_noise)

def _batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    view_q = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    view_k = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return view_q, view_k, _random_boxes(n, size, seed)


def _views(view_q, view_k, masked, generator, mask_mode="zero", **options):
    """Draw as method.draw_noise does (photometric parameters for 2N rows, then the noise mask's fill),
    then views_from_params."""
    params = augment.sample_photometric(2 * view_q.shape[0], generator, view_q.device)
    noise = augment.draw_mask_noise(view_q.shape, generator, view_q.device) if mask_mode == "noise" else None
    return augment.views_from_params(view_q, view_k, masked, params, noise, mask_mode=mask_mode, **options)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_views_shapes_dtype_layout(out_dtype, channels_last):
    view_q, view_k, masked = _batch()
    x_q, x_k = _views(view_q, view_k, masked, torch.Generator().manual_seed(0), out_dtype=out_dtype,
                      channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x in (x_q, x_k):
        assert x.shape == view_q.shape and x.dtype == out_dtype
        assert x.is_contiguous(memory_format=fmt)


def test_views_mask_only_the_query_box():
    view_q, view_k, masked = _batch()
    kernel_size = augment.default_blur_kernel_size(32)
    outputs = {mode: _views(view_q, view_k, masked, torch.Generator().manual_seed(5), mode)
               for mode in augment.MASK_MODES}
    # the documented layout of the parameters: 2N rows, the query's first
    params = augment.sample_photometric(8, torch.Generator().manual_seed(5), "cpu")
    params_q = PhotometricParams(*(t[:4] for t in params))
    params_k = PhotometricParams(*(t[4:] for t in params))
    plain_q = augment.normalize(augment.apply_photometric(view_q, params_q, kernel_size))
    plain_k = augment.normalize(augment.apply_photometric(view_k, params_k, kernel_size))
    inside = _box_mask_reference(masked, 32, 32).expand_as(plain_q)
    for mode, (x_q, x_k) in outputs.items():
        torch.testing.assert_close(x_k, plain_k, atol=1e-6, rtol=0)  # the key view is never masked
        torch.testing.assert_close(x_q[~inside], plain_q[~inside], atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs["none"][0], plain_q, atol=1e-6, rtol=0)
    assert torch.all(outputs["zero"][0][inside] == 0)


def test_views_are_deterministic_given_the_seed():
    view_q, view_k, masked = _batch()
    a, b = (_views(view_q, view_k, masked, torch.Generator().manual_seed(1), "noise") for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- bad input

def test_bad_input_names_the_argument():
    view_q, view_k, masked = _batch()
    g = torch.Generator().manual_seed(0)
    params = augment.sample_photometric(8, g, "cpu")
    with pytest.raises(ValueError, match="view_q"):
        augment.views_from_params(view_q.float(), view_k, masked, params, None)
    with pytest.raises(ValueError, match="view_k"):
        augment.views_from_params(view_q, view_k[:, :2], masked, params, None)
    with pytest.raises(ValueError, match="view_k"):
        augment.views_from_params(view_q, view_k[:2], masked, params, None)
    with pytest.raises(ValueError, match="masked"):
        augment.views_from_params(view_q, view_k, masked[:2], params, None)
    with pytest.raises(ValueError, match="mask_mode"):
        augment.views_from_params(view_q, view_k, masked, params, None, mask_mode="cutout")
    with pytest.raises(ValueError, match="views"):
        augment.apply_photometric(view_q[0], _params(4))
    with pytest.raises(ValueError, match="params"):
        augment.apply_photometric(view_q, _params(3))
    with pytest.raises(ValueError, match="blur_kernel_size"):
        augment.apply_photometric(view_q, _params(4), blur_kernel_size=4)
    with pytest.raises(ValueError, match="boxes"):
        augment.mask_boxes(torch.zeros(4, 3, 8, 8), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="mode"):
        augment.mask_boxes(torch.zeros(4, 3, 8, 8), torch.zeros(4, 4), mode="cutout")
    with pytest.raises(ValueError, match="gray_prob"):
        augment.sample_photometric(4, g, "cpu", gray_prob=1.5)
    with pytest.raises(ValueError, match="blur_sigma"):
        augment.sample_photometric(4, g, "cpu", blur_sigma=(0.0, 2.0))


# ---- GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_host_sync():
    view_q, view_k, masked = _batch(n=8, size=64)
    p = augment.sample_photometric(8, torch.Generator().manual_seed(0), "cpu")
    ref = augment.apply_photometric(view_q, p)
    out = augment.apply_photometric(view_q.cuda(), PhotometricParams(*(t.cuda() for t in p)))
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=0)  # GPU depthwise conv: other sum order
    g = torch.Generator(device="cuda").manual_seed(0)
    args = (view_q.cuda(), view_k.cuda(), masked.cuda(), g)
    _views(*args, mask_mode="noise")  # warm-up: lazy CUDA init may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in augment.MASK_MODES:  # the draws and the views: no host sync
            _views(*args, mask_mode=mode, out_dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_step_inputs_do_not_depend_on_the_precision_flag():
    """Augmentation is fp32 even when the step's caller is under bf16 autocast (only encoders autocast)."""
    import pipelines
    from maskco.method import MethodSpec, draw_noise, inputs_from_noise
    from maskco.config import Config

    generator = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (2, 4, 3, 64, 64), dtype=torch.uint8, generator=generator)
    crops = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.1, 0.0, 0.9, 1.0, 1.0]]).repeat(2, 1)  # [4, 5]
    batch = pipelines.Batch(views[0], views[1], crops, crops.flip(0))
    spec = MethodSpec.from_config(Config(), image_size=64, num_negatives=2, box_min_size=8.0, blur_prob=1.0,
                                  jitter_prob=1.0)
    noise = draw_noise(spec, 4, "cpu", torch.Generator().manual_seed(1))
    plain = inputs_from_noise(batch, spec, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = inputs_from_noise(batch, spec, noise)
    for name in ("x_q", "x_k", "boxes_q", "boxes_k", "valid"):
        assert getattr(autocast, name).dtype == getattr(plain, name).dtype, name
        torch.testing.assert_close(getattr(autocast, name), getattr(plain, name), rtol=0, atol=1e-6, msg=name)
