"""mIoU and pixel accuracy through torchmetrics.

The metrics are accumulated over the whole dataset (one confusion matrix, not an average of
per-image scores), ignoring ``IGNORE_INDEX`` pixels, as the ADE20K benchmark scores them:
``mIoU`` is the mean over classes of TP / (TP + FP + FN), over the classes present in the
ground truth or the predictions; ``aAcc`` is the fraction of labelled pixels predicted
right; ``mAcc`` the mean of per-class accuracies. Reported in percent.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .model import IGNORE_INDEX


def segmentation_metrics(num_classes: int, ignore_index: int = IGNORE_INDEX):
    """A torchmetrics ``MetricCollection`` with ``mIoU``, ``aAcc`` and ``mAcc`` (fractions);
    ``update(pred, target)`` with class-index maps, ``compute()`` syncs over processes."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    return MetricCollection({
        "mIoU": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
        "aAcc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        "mAcc": MulticlassAccuracy(num_classes, average="macro", ignore_index=ignore_index),
    })


def predict_logits(model, images: torch.Tensor, size, scales: Sequence[float] = (1.0,),
                   flip: bool = False) -> torch.Tensor:
    """Class scores at ``size``, averaged over input ``scales`` and, with ``flip``, their
    mirror images (the multi-scale test of the recipe uses 0.75-1.25 and flip)."""
    total = None
    h, w = images.shape[-2:]
    for s in scales:
        x = images if s == 1.0 else F.interpolate(
            images, size=(max(32, round(h * s)), max(32, round(w * s))), mode="bilinear",
            align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            inp = x.flip(-1) if mirrored else x
            logits = model(inp)["out"].float()
            if mirrored:
                logits = logits.flip(-1)
            probs = F.interpolate(logits, size=size, mode="bilinear",
                                  align_corners=False).softmax(1)
            total = probs if total is None else total + probs
    return total


@torch.no_grad()
def evaluate_segmenter(model, loader, num_classes: int, device, amp: str = "none",
                       info=None, progress: bool = True, scales: Sequence[float] = (1.0,),
                       flip: bool = False) -> dict[str, float]:
    """``mIoU``, ``aAcc``, ``mAcc`` (percent) of ``model`` over ``loader``; under torchrun
    every rank scores its share and torchmetrics sums the confusion counts."""
    from tqdm import tqdm

    from ..training.step import autocast

    model.eval()
    metrics = segmentation_metrics(num_classes).to(device)
    is_main = info is None or info.is_main
    for images, masks in tqdm(loader, desc="eval", disable=not (progress and is_main),
                              leave=False, dynamic_ncols=True):
        images, masks = images.to(device), masks.to(device)
        with autocast(device, amp):
            scores = predict_logits(model, images, masks.shape[-2:], scales, flip)
        metrics.update(scores.argmax(1), masks)
    return {k: 100.0 * float(v) for k, v in metrics.compute().items()}
