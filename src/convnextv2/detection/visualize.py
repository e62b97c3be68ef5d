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
    return model, list(ckpt.get("classes") or ckpt["config"].get("class_names") or [])


@torch.no_grad()
def predict_and_draw(model, pixels: torch.Tensor, classes, score_thresh: float = 0.5,
                     device="cpu"):
    """``pixels``: uint8 (3, H, W). Returns the drawn uint8 image and the kept
    ``(name, score, box)`` triples."""
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    model.eval()
    pred = model([F.to_dtype(pixels, torch.float32, scale=True).to(device)])[0]
    keep = pred["scores"] >= score_thresh
    boxes, labels, scores = (pred["boxes"][keep].cpu(), pred["labels"][keep].cpu(),
                             pred["scores"][keep].cpu())
    drawn = pixels
    if "masks" in pred and keep.any():
        drawn = draw_segmentation_masks(drawn, pred["masks"][keep][:, 0].cpu() > 0.5, alpha=0.45)
    names = [classes[int(lab) - 1] if 0 < int(lab) <= len(classes) else str(int(lab))
             for lab in labels]
    if len(boxes):
        drawn = draw_bounding_boxes(drawn, boxes, width=1 if max(pixels.shape) < 256 else 2,
                                    labels=[f"{n} {s:.2f}" for n, s in zip(names, scores)])
    return drawn, list(zip(names, scores.tolist(), boxes.tolist()))
