"""Whole-image and sliding-window inference of a segmenter, one image at a time.

The ADE20K numbers of the paper come from sliding windows: the test image (short side 512) is
covered by 512x512 windows at stride 341, the last row and column of windows pushed back
inside the image, each window's logits added where it lies and divided by how many windows
covered each pixel (MMSegmentation's ``slide_inference``). ``whole`` runs the network once on
the full image. Either way the class scores are resized to the size the image is scored at.

The settings live in the model's config (``test``: mode, window, stride, size), written at
training time, so ``segment eval`` and ``predict`` default to what the model was meant for.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

MODES = ("slide", "whole")


def default_stride(window: int) -> int:
    """The sliding-window stride of the ADE20K configs for a window: 341 for 512 (2/3)."""
    return max(1, window * 2 // 3)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: ``ceil((length - window) / stride) + 1``
    windows (one where the image fits in a window), the last ending at the image's edge."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, length) - window, 0) for i in range(count)]


def slide_logits(model, image: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Logits (1, K, H, W) of ``image`` (1, 3, H, W) from overlapping ``window`` crops."""
    h, w = image.shape[-2:]
    total = count = None
    for top in window_starts(h, window, stride):
        for left in window_starts(w, window, stride):
            crop = image[..., top:top + window, left:left + window]
            logits = model(crop)["out"].float()
            if total is None:
                total = logits.new_zeros(1, logits.shape[1], h, w)
                count = logits.new_zeros(1, 1, h, w)
            total[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] += logits
            count[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] += 1
    return total / count


def image_logits(model, image: torch.Tensor, mode: str = "whole", window: int = 512,
                 stride: int = 341) -> torch.Tensor:
    """Logits (1, K, H, W) of one image (1, 3, H, W), by ``mode``."""
    if mode == "slide":
        return slide_logits(model, image, window, stride)
    if mode == "whole":
        return model(image)["out"].float()
    raise ValueError(f"inference mode {mode!r}: choose one of {', '.join(MODES)}")


def predict_scores(model, image: torch.Tensor, size, mode: str = "whole", window: int = 512,
                   stride: int = 341, scales: Sequence[float] = (1.0,),
                   flip: bool = False) -> torch.Tensor:
    """Class probabilities (1, K, *size) of one image (1, 3, H, W), averaged over input
    ``scales`` and, with ``flip``, their mirror images (the paper's multi-scale test uses
    0.75-1.25 and flip)."""
    total = None
    h, w = image.shape[-2:]
    for s in scales:
        x = image if s == 1.0 else F.interpolate(
            image, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
            align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            logits = image_logits(model, x.flip(-1) if mirrored else x, mode, window, stride)
            if mirrored:
                logits = logits.flip(-1)
            probs = F.interpolate(logits, size=tuple(size), mode="bilinear",
                                  align_corners=False).softmax(1)
            total = probs if total is None else total + probs
    return total


def test_settings(config: dict, mode: str | None = None, size: int | None = None,
                  window: int | None = None, stride: int | None = None) -> dict:
    """How to test a model: each value as given, else as saved with the model (``config``'s
    ``test``), else whole-image inference at native size (models saved before the setting)."""
    saved = dict(config.get("test") or {})
    if window is None:  # the saved window keeps its saved stride
        window, stride = saved.get("window") or 512, stride or saved.get("stride")
    out = dict(mode=mode or saved.get("mode") or "whole",
               size=size if size is not None else saved.get("size"),
               window=int(window), stride=int(stride or default_stride(window)),
               reduce_zero_label=bool(saved.get("reduce_zero_label", True)))
    if out["mode"] not in MODES:
        raise ValueError(f"--mode {out['mode']!r}: choose one of {', '.join(MODES)}")
    return out
