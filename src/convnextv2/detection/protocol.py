"""The Mask R-CNN settings of the MMDetection configs the ConvNeXt V2 paper used, where
torchvision's defaults differ and the difference moves the reported box AP.

- RoI align with ``sampling_ratio=0`` (adaptive: ceil(bin size) samples per bin) and
  ``aligned=True`` (the half-pixel offset): ``AlignedMultiScaleRoIAlign``. torchvision's
  ``MultiScaleRoIAlign`` samples 2 x 2 points per bin and has no ``aligned`` flag.
- L1 box-regression losses (weight 1) in the RPN and the RoI box head, with torchvision's
  normalisation (the sum over positive samples divided by all sampled anchors / RoIs, which
  is MMDetection's ``avg_factor``): ``L1RegionProposalNetwork`` and ``L1RoIHeads``.
  torchvision uses a smooth L1 with beta 1/9.
- ``PROPOSALS``: RPN keeps 2000 boxes per level before NMS and 1000 after it in training, and
  1000 / 1000 at test (torchvision keeps 2000 after NMS in training).

Everything else of the configs is torchvision's default already (box coder weights 10, 10,
5, 5 = MMDetection's target stds 0.1, 0.1, 0.2, 0.2; samplers of 256 anchors at half positive
and 512 RoIs at a quarter positive; test score threshold 0.05, NMS 0.5, 100 detections; the
FPN level rule with canonical scale 224 = MMDetection's ``finest_scale`` 56). What still
differs is listed in docs/transfer.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _setup_scales

PROPOSALS = dict(rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
                 rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000)


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` (same level rule, same parameters) pooling with
    ``roi_align(..., aligned=True)``; build it with ``sampling_ratio=0``."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes,
                                                         self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1)
                          for i, b in enumerate(boxes)], dim=0)
        levels = self.map_levels(boxes)
        result = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            result[idx] = pooled.to(result.dtype)
        return result


def l1_box_loss(deltas: Tensor, targets: Tensor, normaliser: int) -> Tensor:
    """Summed L1 distance of the predicted and target box deltas over ``normaliser``."""
    return F.l1_loss(deltas, targets, reduction="sum") / max(normaliser, 1)


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with an L1 box loss."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(sampled_pos))[0]
        neg = torch.where(torch.cat(sampled_neg))[0]
        sampled = torch.cat([pos, neg], dim=0)
        objectness = objectness.flatten()
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        box_loss = l1_box_loss(pred_bbox_deltas[pos], regression_targets[pos], sampled.numel())
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled],
                                                             labels[sampled])
        return objectness_loss, box_loss


class L1RoIHeads(RoIHeads):
    """torchvision's RoI heads with an L1 box loss: the sampled RoIs' labels and targets and
    the box predictor's output of the same forward give ``loss_box_reg`` anew (torchvision's
    smooth-L1 value is dropped)."""

    def select_training_samples(self, proposals, targets):
        sampled = super().select_training_samples(proposals, targets)
        self._sampled = sampled  # proposals, matched_idxs, labels, regression_targets
        return sampled

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        seen = []
        hook = self.box_predictor.register_forward_hook(lambda m, i, out: seen.append(out))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
        _, _, labels, regression_targets = self._sampled
        self._sampled = None
        _, box_regression = seen[0]
        losses["loss_box_reg"] = roi_box_loss(box_regression, labels, regression_targets)
        return result, losses


def roi_box_loss(box_regression: Tensor, labels: list[Tensor],
                 regression_targets: list[Tensor]) -> Tensor:
    """L1 loss of each positive RoI's deltas for its own class, over all sampled RoIs."""
    labels, targets = torch.cat(labels), torch.cat(regression_targets)
    pos = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)
    return l1_box_loss(deltas[pos, labels[pos]], targets[pos], labels.numel())


def apply_protocol(model) -> None:
    """Give a built torchvision ``FasterRCNN`` / ``MaskRCNN`` the L1 losses (the RoI align and
    the proposal counts are constructor arguments, see ``model.build_detector``)."""
    model.rpn.__class__ = L1RegionProposalNetwork
    model.roi_heads.__class__ = L1RoIHeads
    model.roi_heads._sampled = None
