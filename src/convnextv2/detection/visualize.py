"""Detections drawn on the image: masks, boxes, class names and scores (torchvision's
drawing utilities)."""
from __future__ import annotations

import torch


def load_detector(checkpoint):
    """A trained detector and its class names from a run's ``model.pt`` (or run folder)."""
    from ..transfer.engine import read_model_file
    from .model import detector_from_config

    ckpt = read_model_file(checkpoint, "detection")
    model = detector_from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    classes = list(ckpt.get("classes") or ckpt["config"].get("class_names") or [])
    # the training file's category ids (COCO's 1..90 with gaps); older models: 1..K
    model.category_ids = list(ckpt["config"].get("category_ids")
                              or range(1, len(classes) + 1))
    return model, classes


@torch.no_grad()
def predict(model, pixels: torch.Tensor, device="cpu") -> dict:
    """The detector's output for ``pixels`` (uint8, (3, H, W)) on the CPU: ``boxes`` xyxy,
    ``labels`` 1..K, ``scores`` and, for Mask R-CNN, soft ``masks`` (N, 1, H, W)."""
    from torchvision.transforms.v2 import functional as F

    model.eval()
    pred = model([F.to_dtype(pixels, torch.float32, scale=True).to(device)])[0]
    return {k: v.cpu() for k, v in pred.items()}


def draw(pixels: torch.Tensor, pred: dict, classes, score_thresh: float = 0.5):
    """``pred`` drawn on ``pixels``: the drawn uint8 image and the kept ``(name, score, box)``
    triples (score at least ``score_thresh``)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = pred["scores"] >= score_thresh
    boxes, labels, scores = pred["boxes"][keep], pred["labels"][keep], pred["scores"][keep]
    drawn = pixels
    if "masks" in pred and keep.any():
        drawn = draw_segmentation_masks(drawn, pred["masks"][keep][:, 0] > 0.5, alpha=0.45)
    names = [classes[int(lab) - 1] if 0 < int(lab) <= len(classes) else str(int(lab))
             for lab in labels]
    if len(boxes):
        drawn = draw_bounding_boxes(drawn, boxes, width=1 if max(pixels.shape) < 256 else 2,
                                    labels=[f"{n} {s:.2f}" for n, s in zip(names, scores)])
    return drawn, list(zip(names, scores.tolist(), boxes.tolist()))


def predict_and_draw(model, pixels: torch.Tensor, classes, score_thresh: float = 0.5,
                     device="cpu"):
    """``predict`` then ``draw``."""
    return draw(pixels, predict(model, pixels, device), classes, score_thresh)
