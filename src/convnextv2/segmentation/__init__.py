"""Semantic segmentation: UPerNet on a ConvNeXt V2 backbone, ADE20K-layout data, mIoU and
pixel accuracy."""
from .model import UPerNet, build_segmenter, segmentation_loss, segmenter_from_config

__all__ = ["UPerNet", "build_segmenter", "segmentation_loss", "segmenter_from_config"]
