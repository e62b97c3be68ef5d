"""mIoU and pixel accuracy from one confusion matrix, as the ADE20K benchmark scores them.

The counts are accumulated over the whole dataset (not an average of per-image scores),
ignoring ``IGNORE_INDEX`` pixels, and summed over processes under torchrun. From the matrix:
``mIoU`` is the mean over classes of TP / (TP + FP + FN), leaving out classes absent from both
the predictions and the ground truth (their IoU is 0/0: MMSegmentation's ``nanmean``; some
torchmetrics versions count them as 0, which lowers the score on any split that lacks a
class); ``aAcc`` is the fraction of labelled pixels predicted right; ``mAcc`` the mean of
per-class accuracies over the classes present in the ground truth. Reported in percent.

Every image is predicted and scored at its own size (``inference.predict_scores``), so images
of different sizes in one batch are never stretched to a shared padded size.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .inference import predict_scores
from .model import IGNORE_INDEX


class ConfusionMatrix:
    """``counts[t, p]``: labelled pixels of true class ``t`` predicted as ``p``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device="cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        k = self.num_classes
        self.counts += torch.bincount(t * k + p, minlength=k * k).view(k, k).to(self.counts)

    def all_reduce(self) -> None:
        """Sum the counts over torchrun's processes (no-op without a process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    def compute(self) -> dict[str, float]:
        """``mIoU``, ``aAcc``, ``mAcc`` as fractions (NaN-free: classes with an empty union or
        no ground truth are left out of the means)."""
        c = self.counts.double()
        tp, truth, predicted = c.diag(), c.sum(1), c.sum(0)
        union = truth + predicted - tp
        total = c.sum()
        return {"mIoU": float((tp / union)[union > 0].mean()) if (union > 0).any() else 0.0,
                "aAcc": float(tp.sum() / total) if total > 0 else 0.0,
                "mAcc": float((tp / truth)[truth > 0].mean()) if (truth > 0).any() else 0.0}


def segmentation_metrics(num_classes: int, ignore_index: int = IGNORE_INDEX, device="cpu"):
    return ConfusionMatrix(num_classes, ignore_index, device)


@torch.no_grad()
def evaluate_segmenter(model, loader, num_classes: int, device, amp: str = "none",
                       info=None, progress: bool = True, scales: Sequence[float] = (1.0,),
                       flip: bool = False, mode: str = "whole", window: int = 512,
                       stride: int = 341) -> dict[str, float]:
    """``mIoU``, ``aAcc``, ``mAcc`` (percent) of ``model`` over ``loader`` (batches of
    ``collate_eval``: images, and masks at each image's own size), by ``mode`` (``slide``
    windows of ``window`` px at ``stride``, or ``whole``); under torchrun every rank scores
    its share and the confusion counts are summed."""
    from tqdm import tqdm

    from ..training.step import autocast

    model.eval()
    matrix = ConfusionMatrix(num_classes, device=device)
    is_main = info is None or info.is_main
    for images, masks in tqdm(loader, desc="eval", disable=not (progress and is_main),
                              leave=False, dynamic_ncols=True):
        for image, mask in zip(images, masks):
            image, mask = image.to(device)[None], mask.to(device)
            with autocast(device, amp):
                scores = predict_scores(model, image, mask.shape[-2:], mode, window, stride,
                                        scales, flip)
            matrix.update(scores.argmax(1)[0], mask)
    matrix.all_reduce()
    return {k: 100.0 * v for k, v in matrix.compute().items()}
