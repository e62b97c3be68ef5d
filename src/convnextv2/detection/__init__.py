"""Object detection and instance segmentation: torchvision's Mask R-CNN / Faster R-CNN on a
ConvNeXt V2 + FPN backbone, COCO-format data read with pycocotools, COCO box and mask mAP."""
from .model import ConvNeXtFPN, build_detector, detector_from_config

__all__ = ["ConvNeXtFPN", "build_detector", "detector_from_config"]
