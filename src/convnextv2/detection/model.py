"""Mask R-CNN and Faster R-CNN on a ConvNeXt V2 backbone, from torchvision's parts.

The detector is torchvision's ``MaskRCNN`` / ``FasterRCNN``: its anchor generator, RPN, RoI
align, box and mask heads and its resize-and-normalise transform. What this module adds is the
backbone: ConvNeXt V2's four stage maps (strides 4-32, each through a channel LayerNorm) fed to
``torchvision.ops.FeaturePyramidNetwork`` with a max-pooled fifth level, as in the ConvNeXt
Mask R-CNN setup (FPN on the four stage widths, 256 channels, 5 levels). The backbone has no
BatchNorm, so nothing needs freezing or converting: it trains in full with drop path and the
layer-wise lr decay of ``training.layer_decay``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..transfer.backbone import ConvNeXtBackbone, backbone_config, build_backbone
from .protocol import PROPOSALS, AlignedMultiScaleRoIAlign, apply_protocol

COCO_ANCHOR_SIZES = (32, 64, 128, 256, 512)


class ConvNeXtFPN(nn.Module):
    """ConvNeXt V2 stage maps -> FPN levels ``'0'..'3'`` (strides 4-32) and ``'pool'`` (64)."""

    def __init__(self, backbone: ConvNeXtBackbone, out_channels: int = 256):
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(backbone.channels, out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # read by torchvision's RPN and RoI heads

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_detector(num_classes: int, backbone: ConvNeXtBackbone | None = None, *,
                   masks: bool = True, fpn_channels: int = 256, min_size: int = 800,
                   max_size: int = 1333, anchor_sizes: Sequence[int] = COCO_ANCHOR_SIZES,
                   aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                   box_head_dim: int = 1024, mask_head_dim: int = 256,
                   roi_canonical_scale: int = 224,
                   image_mean: Sequence[float] = IMAGENET_MEAN,
                   image_std: Sequence[float] = IMAGENET_STD, **rcnn_kwargs) -> nn.Module:
    """torchvision's ``MaskRCNN`` (``masks=True``) or ``FasterRCNN`` on ``backbone``.

    ``num_classes`` counts object classes only; torchvision's background class 0 is added
    here, so predicted labels 1..num_classes are the dataset's classes in order. Inputs are
    lists of 0-1 float images of any size; the model resizes them (shorter side ``min_size``,
    longer at most ``max_size``) and normalises with ``image_mean``/``image_std``.
    ``anchor_sizes``: one size per FPN level (5). ``box_head_dim`` (the two-layer box MLP) and
    ``mask_head_dim`` (the four-conv mask head) are torchvision's 1024 and 256 by default;
    smaller values suit small images and CPUs. ``roi_canonical_scale``: the box side that RoI
    align takes from the stride-16 level (FPN paper: 224, for ~800 px images); scale it with
    the image size, or small images pool every object from the shallow stride-4 level.
    ``rcnn_kwargs`` go to torchvision
    (``rpn_post_nms_top_n_train``, ``box_detections_per_img``, ``box_score_thresh`` ...).
    The heads follow the MMDetection configs of the paper (``protocol.py``): RoI align with
    sampling ratio 0 and ``aligned=True``, L1 box losses, 2000/1000 proposals (pre/post NMS)
    in training and 1000/1000 at test unless ``rcnn_kwargs`` say otherwise.
    """
    if num_classes < 1:
        raise ValueError(f"a detector needs at least one object class, got {num_classes}")
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per FPN level (5), got {list(anchor_sizes)}")
    backbone = backbone if backbone is not None else build_backbone("convnextv2_tiny")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes),
                              (tuple(float(a) for a in aspect_ratios),) * len(anchor_sizes))
    levels = ["0", "1", "2", "3"]
    heads = dict(box_roi_pool=AlignedMultiScaleRoIAlign(levels, 7, 0,
                                                        canonical_scale=roi_canonical_scale),
                 box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
                 box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1))
    if masks:
        heads.update(mask_roi_pool=AlignedMultiScaleRoIAlign(levels, 14, 0,
                                                             canonical_scale=roi_canonical_scale),
                     mask_head=MaskRCNNHeads(fpn_channels, [mask_head_dim] * 4, 1),
                     mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim,
                                                      num_classes + 1))
    cls = MaskRCNN if masks else FasterRCNN
    model = cls(ConvNeXtFPN(backbone, fpn_channels), num_classes=None,
                min_size=min_size, max_size=max_size, image_mean=list(image_mean),
                image_std=list(image_std), rpn_anchor_generator=anchors, **heads,
                **{**PROPOSALS, **rcnn_kwargs})
    apply_protocol(model)
    model.config = dict(task="detection", num_classes=int(num_classes), masks=bool(masks),
                        fpn_channels=int(fpn_channels), min_size=int(min_size),
                        max_size=int(max_size), anchor_sizes=[int(s) for s in anchor_sizes],
                        aspect_ratios=[float(a) for a in aspect_ratios],
                        box_head_dim=int(box_head_dim), mask_head_dim=int(mask_head_dim),
                        roi_canonical_scale=int(roi_canonical_scale),
                        image_mean=[float(m) for m in image_mean],
                        image_std=[float(s) for s in image_std],
                        backbone=backbone_config(backbone), rcnn=dict(rcnn_kwargs))
    return model


def detector_from_config(config: dict) -> nn.Module:
    """Rebuild a detector (random weights) from the ``config`` saved with it."""
    from ..transfer.backbone import build_backbone as _bb
    cfg = dict(config)
    bb = dict(cfg.pop("backbone"))
    backbone = _bb(None, None, drop_path_rate=bb.pop("drop_path_rate", 0.0), **bb)
    cfg.pop("task", None)
    rcnn = cfg.pop("rcnn", {}) or {}
    cfg.pop("class_names", None)
    cfg.pop("category_ids", None)
    return build_detector(cfg.pop("num_classes"), backbone, **cfg, **rcnn)
