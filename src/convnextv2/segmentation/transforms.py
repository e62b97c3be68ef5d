"""The ADE20K training and test pipelines, as MMSegmentation's configs for the paper run them.

Training: ``Resize(scale=(2048, 512), keep_ratio=True)`` with a random ratio in 0.5-2.0, a
512x512 ``RandomCrop`` with ``cat_max_ratio=0.75``, a horizontal flip, the photometric
distortion, and padding to the crop size (image with the mean colour, i.e. 0 after
normalisation; mask with ignore). Test: the same keep-ratio resize without the ratio (short
side 512 for ADE20K's images); the mask stays at its original size.

Why not torchvision's ``ScaleJitter``: it reads its target as a (height, width) box, so a
(512, 2048) target caps the *width* at 512, and a 683x512 landscape image trains at 512x384
where the keep-ratio rule gives 683x512 (0.75x the test scale). ``keep_ratio_scale`` is one
rule for both orientations: the largest factor that fits the long edge in the long target and
the short edge in the short target.

All transforms take and give ``(image, mask)``: a uint8 image tensor (3, H, W) and an int64
mask (H, W); ``ToFloat`` ends the pipeline with a 0-1 float image (the model normalises).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ..data.transforms import IMAGENET_MEAN
from .model import IGNORE_INDEX

# MMSegmentation's PhotoMetricDistortion ranges (on 0-255 pixels; hue on OpenCV's 0-180 circle)
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
CAT_MAX_RATIO = 0.75
PAD_COLOUR = tuple(round(255 * m) for m in IMAGENET_MEAN)  # 0 once normalised


def keep_ratio_scale(height: int, width: int, long_target: float, short_target: float) -> float:
    """The factor that fits the image's long edge in ``long_target`` and its short edge in
    ``short_target`` (MMCV's ``rescale_size`` with ``keep_ratio``), whatever the orientation."""
    return min(long_target / max(height, width), short_target / min(height, width))


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_pair(image: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int]):
    """Bilinear (antialiased) image, nearest-neighbour mask, to ``size`` (H, W)."""
    if tuple(image.shape[-2:]) != tuple(size):
        image = TF.resize(image, list(size), antialias=True)
        if mask is not None:
            # float: exact for class indices, and nearest resizing has no int64 kernel
            mask = TF.resize(mask[None].float(), list(size),
                             interpolation=TF.InterpolationMode.NEAREST_EXACT)[0].long()
    return image, mask


class KeepRatioResize:
    """Rescale by ``keep_ratio_scale`` to (``long``, ``short``) times a ratio drawn uniformly
    from ``ratio_range`` (None: no ratio, the test resize). ``resize_mask=False`` leaves the
    mask at its size (test: predictions are scored at the original size)."""

    def __init__(self, long: int, short: int, ratio_range=None, resize_mask: bool = True):
        self.long, self.short, self.ratio_range = long, short, ratio_range
        self.resize_mask = resize_mask

    def __call__(self, image, mask):
        ratio = random.uniform(*self.ratio_range) if self.ratio_range else 1.0
        h, w = image.shape[-2:]
        size = scaled_size(h, w, keep_ratio_scale(h, w, self.long * ratio, self.short * ratio))
        image, resized = resize_pair(image, mask if self.resize_mask else None, size)
        return image, (resized if self.resize_mask else mask)


class RandomCropCatMax:
    """A random ``crop`` x ``crop`` window (smaller where the image is), redrawn up to 10 times
    while one class covers ``cat_max_ratio`` or more of its labelled pixels (or it holds fewer
    than two classes), then padded at the bottom/right to the full crop: image with
    ``PAD_COLOUR``, mask with ignore (MMSegmentation's ``RandomCrop`` + ``Pad``)."""

    def __init__(self, crop: int, cat_max_ratio: float = CAT_MAX_RATIO, tries: int = 10):
        self.crop, self.cat_max_ratio, self.tries = crop, cat_max_ratio, tries

    def _window(self, h: int, w: int) -> tuple[int, int]:
        return random.randint(0, max(h - self.crop, 0)), random.randint(0, max(w - self.crop, 0))

    def __call__(self, image, mask):
        h, w = image.shape[-2:]
        top, left = self._window(h, w)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.tries):
                window = mask[top:top + self.crop, left:left + self.crop]
                counts = torch.bincount(window[window != IGNORE_INDEX].flatten())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = self._window(h, w)
        image = image[:, top:top + self.crop, left:left + self.crop]
        mask = mask[top:top + self.crop, left:left + self.crop]
        return pad_to(image, mask, self.crop)


def pad_to(image, mask, size: int):
    """Pad at the bottom/right to at least ``size`` x ``size``."""
    h, w = image.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        fill = torch.tensor(PAD_COLOUR, dtype=image.dtype).view(3, 1, 1)
        padded = fill.expand(3, h + ph, w + pw).clone()
        padded[:, :h, :w] = image
        image = padded
        mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
    return image, mask


class HorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, mask):
        if random.random() < self.p:
            return image.flip(-1), mask.flip(-1)
        return image, mask


def adjust_saturation_hsv(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale HSV saturation by ``factor`` (clipped at 1), hue and value kept; float 0-255.

    In HSV every channel is ``V * (1 - S * f)`` with ``f`` fixed by the hue, so scaling S by
    ``k`` moves each channel towards V: ``c' = V - k (V - c)``, with ``k`` capped where S
    would pass 1 (the smallest channel reaches 0). No round trip through HSV needed.
    """
    value = image.max(0, keepdim=True).values
    low = image.min(0, keepdim=True).values
    cap = torch.where(value > low, value / (value - low).clamp_min(1e-6),
                      torch.full_like(value, factor))
    return value - torch.minimum(torch.full_like(value, factor), cap) * (value - image)


class PhotoMetricDistortion:
    """MMSegmentation's photometric distortion, each step with probability 0.5: brightness
    +-32, contrast x0.5-1.5 (before or after the colour steps, at random), saturation
    x0.5-1.5 in HSV, hue +-18 on the 0-180 circle; pixels clipped to 0-255 after each."""

    def __call__(self, image, mask):
        x = image.float()
        if random.random() < 0.5:
            x = (x + random.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)).clamp(0, 255)
        contrast_first = random.random() < 0.5
        if contrast_first and random.random() < 0.5:
            x = (x * random.uniform(*CONTRAST_RANGE)).clamp(0, 255)
        if random.random() < 0.5:
            x = adjust_saturation_hsv(x, random.uniform(*SATURATION_RANGE)).clamp(0, 255)
        if random.random() < 0.5:
            delta = random.randint(-HUE_DELTA, HUE_DELTA)
            x = TF.adjust_hue(x / 255.0, delta / 180.0) * 255.0
        if not contrast_first and random.random() < 0.5:
            x = (x * random.uniform(*CONTRAST_RANGE)).clamp(0, 255)
        return x.round().to(torch.uint8), mask


class ToFloat:
    """uint8 image -> 0-1 float; mask -> int64."""

    def __call__(self, image, mask):
        return image.float() / 255.0, mask.long()


class Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, image, mask):
        for step in self.steps:
            image, mask = step(image, mask)
        return image, mask


def train_transforms(crop: int, scale: tuple[int, int] | None = None,
                     ratio_range: tuple[float, float] = (0.5, 2.0), photometric: bool = True,
                     cat_max_ratio: float = CAT_MAX_RATIO):
    """The training pipeline; ``scale`` is (short, long), default (crop, 4 * crop): ADE20K's
    (512, 2048) at crop 512."""
    short, long = scale or (crop, 4 * crop)
    steps = [KeepRatioResize(long, short, tuple(ratio_range)),
             RandomCropCatMax(crop, cat_max_ratio), HorizontalFlip()]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(ToFloat())
    return Compose(steps)


def eval_transforms(size: int | None = None):
    """Test images rescaled by the keep-ratio rule to (4 * size, size), i.e. short side
    ``size`` unless the long side would pass 4x that (None: as they are); masks stay at the
    original size, and predictions are resized back to it before scoring."""
    steps = [KeepRatioResize(4 * size, size, None, resize_mask=False)] if size else []
    return Compose([*steps, ToFloat()])

