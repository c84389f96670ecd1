"""Each RoI is centred on its box through the trunk, whatever the flips (DESIGN 4.4).

Where a feature looks is measured the way a network sees it: the gradient of a C5 cell (or of a pooled
region, summed over channels) with respect to the input, and the centroid of its magnitude, in continuous
pixels (pixel p spans [p, p + 1)). Networks are randomly initialised with BatchNorm in eval mode (the
identity at init), so each sample's gradient is that of its own convolutions: in train mode the batch
statistics would add a term spread over the whole map and over the batch.
"""
import pytest
import torch
from torch import nn

from geometry import cut_view, pixel_crops
from maskco import boxes, model

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None] * 255  # [3, 1, 1] ImageNet, on the uint8 scale
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None] * 255
SOURCE = 256  # source image side in pixels; views are cut from it like a loader does
TOLERANCE = 0.03  # of the source side: the bound on query-vs-positive disagreement
MAPPINGS = ("default", "half_pixel")  # the Encoder's default roi_centering (receptive), and the old mapping


def trunk_encoder(arch: str, dilated: bool, mapping: str = "default", stem: str = "imagenet",
                  width: float = 1.0) -> model.Encoder:
    """A random ``arch`` trunk (seed 0) without MPH, BN in eval mode; ``mapping`` from MAPPINGS."""
    torch.manual_seed(0)
    kwargs = {} if mapping == "default" else {"roi_centering": mapping}
    return model.Encoder(arch, dilated=dilated, mph="none", stem=stem, width=width, **kwargs).eval()


def symmetrise_kernels_(encoder: model.Encoder) -> model.Encoder:
    """Average every conv kernel with its mirror images. One random draw's kernels are lopsided by chance,
    which moves a cell's gradient centroid by 1-2 px (std over seeds); this removes that noise and keeps what
    decides where a cell looks: strides, paddings, kernel sizes, max-pool."""
    with torch.no_grad():
        for conv in (m for m in encoder.backbone.modules() if isinstance(m, nn.Conv2d)):
            w = conv.weight  # [out, in, k, k]
            w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)
    return encoder


def keep_centre_taps_(encoder: model.Encoder) -> model.Encoder:
    """Zero every conv tap but the centre one: the same layers, strides, paddings and max-pool, but each
    cell's gradient sits on the pixel the cell is centred on instead of spreading over ~80 px (std) that the
    view's edges cut off. That cut moves a region's gradient centroid up to ~25 px toward the view centre, by
    a different amount in the two views of a pair and identically under either RoI mapping."""
    with torch.no_grad():
        for conv in (m for m in encoder.backbone.modules() if isinstance(m, nn.Conv2d)):
            k = conv.kernel_size[0] // 2
            centre = conv.weight[:, :, k, k].clone()  # [out, in]
            conv.weight.zero_()
            conv.weight[:, :, k, k] = centre
    return encoder


def centroid(grad: torch.Tensor) -> torch.Tensor:
    """Input gradients ``[N, 3, S, S]`` -> ``[N, 2]`` (x, y) centroid of their magnitude, continuous pixels."""
    mass = grad.abs().sum(1)  # [N, S, S]
    coord = torch.arange(grad.shape[-1], dtype=mass.dtype) + 0.5  # [S] pixel centres
    total = mass.sum((1, 2))  # [N]
    return torch.stack([(mass.sum(1) * coord).sum(1), (mass.sum(2) * coord).sum(1)], -1) / total[:, None]


def cell_centroids(encoder: model.Encoder, size: int, cells: list[int]) -> torch.Tensor:
    """Gradient centroid of C5 cell (j, j) for each j in ``cells``, one random input each -> ``[len(cells), 2]``."""
    x = torch.randn(len(cells), 3, size, size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    c5 = encoder.trunk(x)  # [n, C, h, w]
    j = torch.tensor(cells)
    grad, = torch.autograd.grad(c5[torch.arange(len(cells)), :, j, j].sum(), x)  # [n, 3, S, S]
    return centroid(grad)


@pytest.mark.parametrize("arch, dilated, size, stem, width, stride", [
    ("resnet18", False, 224, "imagenet", 1.0, 32), ("resnet50", False, 224, "imagenet", 1.0, 32),
    ("resnet50", True, 176, "imagenet", 1.0, 16), ("resnet18", False, 72, "cifar", 0.25, 8),
    ("resnet50", False, 72, "cifar", 0.5, 8), ("resnet50", True, 36, "cifar", 0.25, 4),
    ("resnet18", False, 224, "imagenet", 0.5, 32)])
def test_measured_cell_centre_is_the_encoders(arch, dilated, size, stem, width, stride):
    """Cell j's receptive field is centred at ``stride * j + encoder.cell_centre`` (0.5 px), not at
    ``stride * (j + 1/2)`` as ``roi_align(aligned=True)`` assumes.

    The view's edges cut the receptive fields of off-centre cells and pull their centroids inward by several
    pixels, so the test reads cells j and n - j (n = size / stride, odd): centred at ``stride * j + c`` and
    ``size - stride * j + c``, each is the other's mirror image to within 2c = 1 px, their pulls cancel, and
    ``(x_j + x_{n-j} - size) / 2`` is c itself.
    """
    encoder = symmetrise_kernels_(trunk_encoder(arch, dilated, stem=stem, width=width))
    assert encoder.stride == stride  # measured on the trunk, not assumed
    n = size // encoder.stride
    centres = cell_centroids(encoder, size, [n // 2, n - n // 2])  # [2, 2]: cells j, n - j; x, y
    measured = (centres.sum(0) - size) / 2  # [2] cell 0's centre in x and y
    assert (measured - encoder.cell_centre).abs().max() < 1.0, measured
    half_pixel = trunk_encoder(arch, dilated, "half_pixel", stem, width).cell_centre
    assert half_pixel == encoder.stride / 2
    assert ((measured - half_pixel).abs() > encoder.stride / 2 - 1.5).all(), measured  # the old mapping's error


def region_centres(encoders: list[model.Encoder], views: torch.Tensor, region: torch.Tensor,
                   crop: torch.Tensor) -> list[torch.Tensor]:
    """Where each Encoder's pooled region looks, in source fractions: views ``[N, 3, S, S]``, region ``[N, 4]``
    view pixels, crop ``[N, 5]`` -> one ``[N, 2]`` (x, y) per encoder: the gradient centroid of
    ``Encoder.pool``, mapped back through the crop (and its flip) by ``boxes.view_to_source``. The encoders
    share one trunk (``share_trunk``), so the forward pass is shared too."""
    x = views.clone().requires_grad_()
    features = encoders[0].features(x)  # [N, C, h, w]
    centres = []
    for encoder in encoders:
        assert encoder.backbone is encoders[0].backbone
        grad, = torch.autograd.grad(encoder.pool(features, region[:, None]).sum(), x, retain_graph=True)
        point = centroid(grad)  # [N, 2] view pixels
        centres.append(boxes.view_to_source(torch.cat([point, point], -1), crop, views.shape[-1])[:, :2])
    return centres


def share_trunk(arch: str, dilated: bool) -> list[model.Encoder]:
    """One Encoder per mapping (MAPPINGS order), all on the first one's trunk."""
    encoders = [trunk_encoder(arch, dilated, mapping) for mapping in MAPPINGS]
    for encoder in encoders[1:]:
        encoder.backbone = encoders[0].backbone
    return encoders


def cut_views(image: torch.Tensor, crops: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[3, H, W]`` + crops ``[N, 5]`` -> normalised views ``[N, 3, size, size]``, as a loader cuts them."""
    return torch.stack([(cut_view(image, crop, size).float() - MEAN) / STD for crop in crops])


def with_flip(crops: torch.Tensor, flipped: int) -> torch.Tensor:
    return torch.cat([crops[:, :4], torch.full_like(crops[:, 4:], flipped)], 1)  # [N, 5]


def clamp_shift(region: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """``[N, 4]`` view pixels -> ``[N]`` px by which roi_align's clamp at the last cell moves the box's samples.

    Cells are centred at 0.5 ... ``size - stride + 0.5``: the last ``stride - 0.5`` px at the right and bottom
    of a view (31.5 of 224 at stride 32) hold no cell centre, and samples there are clamped to the last cell,
    whatever the mapping. A flip puts that strip on the other side of the source, so boxes reaching into it
    are pooled off-centre in one view only; the tests leave out those it moves by more than 2 px.
    """
    edge = size - stride + 0.5
    lo, hi = region[:, :2], region[:, 2:]  # [N, 2] each
    top = hi.clamp(max=edge)
    inside = (top - lo).clamp(min=0)  # [N, 2] extent that keeps its place
    mean = (inside * (lo + top) / 2 + (hi - lo - inside) * edge) / (hi - lo).clamp(min=1e-6)  # [N, 2]
    return (mean - (lo + hi) / 2).abs().amax(-1)  # [N]


def unclamped(region: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    return clamp_shift(region, size, stride) <= 2.0  # [N] bool


@pytest.fixture(scope="module", params=[("resnet18", False, 224, 8), ("resnet50", True, 128, 6)],
                ids=["resnet18", "resnet50-dilated"])
def pair_errors(request):
    """Query-vs-positive disagreement in source fractions, ``{mapping: {"same": [P], "mixed": [P]}}``.

    Random crop pairs (loader format) and ``boxes.sample_boxes``; every pair is cut with each view plain and
    flipped, so each crop pair gives two same-flip and two mixed-flip comparisons of the masked box's region in
    the query view with the positive's (``keys[:, 0]``) in the key view. Trunk: ``keep_centre_taps_``.
    """
    arch, dilated, size, n = request.param
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, SOURCE, SOURCE), generator=gen, dtype=torch.uint8)
    crop_q, crop_k = pixel_crops(n, SOURCE, SOURCE, gen), pixel_crops(n, SOURCE, SOURCE, gen)
    encoders = share_trunk(arch, dilated)
    keep_centre_taps_(encoders[0])
    stride = encoders[0].stride
    centres = {mapping: {} for mapping in MAPPINGS}  # mapping -> (branch, flipped) -> [n, 2]
    keep = torch.ones(n, dtype=torch.bool)
    for flipped in (0, 1):
        cq, ck = with_flip(crop_q, flipped), with_flip(crop_k, flipped)
        # the flips enter only through source_to_view: the same seed gives the same source box every time
        sample = boxes.sample_boxes(cq, ck, size, 0, torch.Generator().manual_seed(1))
        keep &= sample.valid & unclamped(sample.masked, size, stride) & unclamped(sample.keys[:, 0], size, stride)
        found_q = region_centres(encoders, cut_views(image, cq, size), sample.masked, cq)
        found_k = region_centres(encoders, cut_views(image, ck, size), sample.keys[:, 0], ck)
        for mapping, q, k in zip(MAPPINGS, found_q, found_k):
            centres[mapping]["q", flipped], centres[mapping]["k", flipped] = q, k
    assert keep.sum() >= n // 2  # enough pairs left to mean something

    def distance(c, flipped_q, flipped_k):  # [P] source fractions
        return (c["q", flipped_q] - c["k", flipped_k]).norm(dim=-1)[keep]
    return {mapping: {"same": torch.cat([distance(c, 0, 0), distance(c, 1, 1)]),
                      "mixed": torch.cat([distance(c, 0, 1), distance(c, 1, 0)])}
            for mapping, c in centres.items()}


def test_query_and_positive_regions_meet_in_the_source_for_every_flip(pair_errors):
    for flips, distance in pair_errors["default"].items():
        assert distance.max() <= TOLERANCE, (flips, distance.tolist())


def test_half_pixel_mapping_misses_on_mixed_flips(pair_errors):
    """The old mapping pools stride/2 - 0.5 px up-left of each box in view pixels: the same way in the source
    for same-flip pairs, opposite ways for mixed-flip pairs, which then miss by about one stride."""
    assert pair_errors["half_pixel"]["mixed"].min() > TOLERANCE, pair_errors["half_pixel"]["mixed"].tolist()


def test_a_flip_moves_no_region_through_a_plain_random_trunk():
    """An untouched random resnet18 (full kernels): the masked box's region in a view and in the same view
    flipped must sit on the same source point. The view edges pull both the same way in the source (a flip
    mirrors view and edges together), so what is left is the mapping: ~1 px with the default (``receptive``),
    ~2 * 15.5 px with ``half_pixel``."""
    size, n = 224, 8
    gen = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, SOURCE, SOURCE), generator=gen, dtype=torch.uint8)
    crops = pixel_crops(n, SOURCE, SOURCE, gen)
    encoders = share_trunk("resnet18", False)
    found, keep = [], torch.ones(n, dtype=torch.bool)
    for flipped in (0, 1):
        crop = with_flip(crops, flipped)
        masked = boxes.sample_boxes(crop, crop, size, 0, torch.Generator().manual_seed(3)).masked  # [n, 4]
        keep &= unclamped(masked, size, encoders[0].stride)
        found.append(region_centres(encoders, cut_views(image, crop, size), masked, crop))  # per mapping [n, 2]
    distance = {mapping: (plain - mirrored).norm(dim=-1)[keep]  # [P] source fractions
                for mapping, plain, mirrored in zip(MAPPINGS, *found)}
    assert len(distance["default"]) >= n // 2
    assert distance["default"].max() <= TOLERANCE / 2, distance["default"].tolist()
    assert distance["half_pixel"].min() > TOLERANCE, distance["half_pixel"].tolist()

