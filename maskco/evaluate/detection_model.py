"""The detector of ``maskco.evaluate.detect``: torchvision's Faster R-CNN around a pretrained ResNet, in the
paper's R50-C4 layout or with an FPN.

**C4** (the paper's and MoCo's detection layout, detectron2's ``Res5ROIHeads``): the trunk up to C4 (stem,
res2..res4) is the backbone and its C4 map the only feature map; the RPN runs on it; each proposal is
RoIAligned from C4 (``roi_size`` x ``roi_size``) and goes through the **pretrained res5 stage** as the box head
(stride 2), average-pooled, then the box predictor. **FPN**: the whole trunk is the bottom-up path of
torchvision's ``BackboneWithFPN`` (C2..C5 plus a max-pooled level), with torchvision's two-layer MLP box head.

Every layer trains and BatchNorm stays a trainable, batch-statistics BatchNorm (MoCo's protocol fine-tunes
with SyncBN, not frozen statistics; on one device that is plain BatchNorm): nothing is frozen. Images are
normalised with the mean and std the backbone was pretrained with (``maskco.augment``'s ImageNet values,
what every pretraining run used), as MoCo's detectron2 configs set ``PIXEL_MEAN`` / ``PIXEL_STD`` to the
pretraining's.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from maskco.augment import IMAGENET_MEAN, IMAGENET_STD

LAYOUTS = ("c4", "fpn")


@dataclass(frozen=True)
class DetectorShape:
    """What sizes the detector: input resize, anchors and RoI sampling (the tool's presets fill it)."""

    min_size: tuple[int, ...]  # training resize of the short side, one drawn per image (torchvision's transform)
    test_size: int  # the short side at test time
    max_size: int
    anchor_sizes: tuple[int, ...]  # px; C4: all on the one map; FPN: one per level, smallest first
    roi_size: int  # RoIAlign output (C4: into res5, which halves it)
    rois_per_image: int  # RoIs sampled per training image for the box head
    rpn_batch: int  # anchors sampled per image for the RPN loss
    proposals: tuple[int, int] = (2000, 1000)  # the RPN's boxes kept after NMS per image (training, test)
    detections: int = 100  # per test image


class C4Trunk(nn.Module):
    """A torchvision ResNet up to C4: conv1, bn1, relu, maxpool (an Identity for the small stem), layer1..3."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.body = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in
                                              ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")))
        self.out_channels = _stage_channels(resnet.layer3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> C4 [B, C4, H/16, W/16]
        return self.body(images)


class Res5Head(nn.Module):
    """The pretrained res5 stage as the box head: RoI features [R, C4, r, r] -> res5 -> average -> [R, C5]."""

    def __init__(self, res5: nn.Module):
        super().__init__()
        self.res5 = res5
        self.out_channels = _stage_channels(res5)

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        return self.res5(rois).mean((2, 3))  # [R, C5, r/2, r/2] -> [R, C5]


def _stage_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage (its last block's last BatchNorm)."""
    last = stage[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def build_detector(resnet: nn.Module, layout: str, num_classes: int, shape: DetectorShape) -> FasterRCNN:
    """A Faster R-CNN for ``num_classes`` object classes (+ background) around ``resnet`` (a torchvision ResNet
    with ``fc = Identity``, its weights taken over, not copied)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    common = {"min_size": shape.min_size, "max_size": shape.max_size, "image_mean": list(IMAGENET_MEAN),
              "image_std": list(IMAGENET_STD), "box_batch_size_per_image": shape.rois_per_image,
              "rpn_batch_size_per_image": shape.rpn_batch, "box_detections_per_img": shape.detections,
              # before NMS twice the boxes kept after it (detectron2's C4: 12000 / 2000 and 6000 / 1000)
              "rpn_pre_nms_top_n_train": 2 * shape.proposals[0], "rpn_post_nms_top_n_train": shape.proposals[0],
              "rpn_pre_nms_top_n_test": 2 * shape.proposals[1], "rpn_post_nms_top_n_test": shape.proposals[1]}
    if layout == "c4":
        trunk, head = C4Trunk(resnet), Res5Head(resnet.layer4)
        anchors = AnchorGenerator((tuple(shape.anchor_sizes),), ((0.5, 1.0, 2.0),))
        pool = MultiScaleRoIAlign(["0"], output_size=shape.roi_size, sampling_ratio=0)
        model = FasterRCNN(trunk, rpn_anchor_generator=anchors, box_roi_pool=pool, box_head=head,
                           box_predictor=FastRCNNPredictor(head.out_channels, num_classes + 1), **common)
    else:
        channels = [_stage_channels(getattr(resnet, f"layer{k}")) for k in range(1, 5)]
        width = max(64, channels[0])  # 256 for a ResNet-50 (torchvision's and detectron2's FPN width)
        fpn = BackboneWithFPN(resnet, {f"layer{k}": str(k - 1) for k in range(1, 5)}, channels, width,
                              extra_blocks=LastLevelMaxPool())
        sizes = tuple((shape.anchor_sizes[0] * 2 ** level,) for level in range(5))
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=shape.roi_size, sampling_ratio=2)
        model = FasterRCNN(fpn, num_classes=num_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=pool,
                           **common)
    return model
