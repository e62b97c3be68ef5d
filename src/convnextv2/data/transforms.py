"""Image transforms for pretraining, fine-tuning and evaluation.

Channels: ``in_chans=1`` converts every image to mode ``L``; ``in_chans=3`` converts to
``RGB`` (a grayscale image is replicated to three channels). Normalisation: ImageNet's
mean/std for 3 channels; for 1 channel the average of ImageNet's three values, mean 0.449 and
std 0.226, so a grayscale image gets nearly the same normalised values whether it is fed as 1
channel or replicated to 3 (and a model can move between the two by summing its stem weights).
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)

RANDAUG = "rand-m9-mstd0.5-inc1"
EVAL_CROP_PCT = 0.875


def mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_chans == 1:
        return GRAY_MEAN, GRAY_STD
    raise ValueError(f"image transforms support in_chans 1 (grayscale) or 3 (RGB), got {in_chans}")


class ToMode:
    """Convert a PIL image to ``L`` (1 channel) or ``RGB`` (3 channels; gray is replicated)."""

    def __init__(self, in_chans: int):
        mean_std(in_chans)  # validates
        self.mode = "L" if in_chans == 1 else "RGB"

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self):
        return f"ToMode({self.mode!r})"


def pretrain_transform(img_size: int, in_chans: int = 3) -> Callable:
    """FCMAE recipe: RandomResizedCrop(scale 0.2-1, bicubic), horizontal flip, normalise."""
    mean, std = mean_std(in_chans)
    return T.Compose([
        ToMode(in_chans),
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def train_transform(img_size: int, in_chans: int = 3, auto_augment: str | None = RANDAUG,
                    reprob: float = 0.25, remode: str = "pixel", recount: int = 1,
                    scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                    color_jitter: float | None = None,
                    interpolation: str = "bicubic") -> Callable:
    """Fine-tuning recipe through timm: RandomResizedCrop, flip, RandAugment
    ``rand-m9-mstd0.5-inc1``, random erasing 0.25 (per-pixel noise), bicubic. ``auto_augment``
    None or "none" disables RandAugment (color jitter is only used then, as in timm)."""
    from timm.data import create_transform

    mean, std = mean_std(in_chans)
    if auto_augment in ("", "none", "None"):
        auto_augment = None
    tf = create_transform(
        input_size=(in_chans, img_size, img_size), is_training=True, scale=scale, hflip=hflip,
        color_jitter=color_jitter or 0.0, auto_augment=auto_augment,
        interpolation=interpolation, mean=mean, std=std, re_prob=reprob, re_mode=remode,
        re_count=recount)
    _keep_one_posterize_bit(tf)
    return T.Compose([ToMode(in_chans), tf])


def _keep_one_posterize_bit(tf) -> None:
    """timm's ``PosterizeIncreasing`` reaches 0 bits at magnitude 10 (reachable with mstd), which
    Pillow >= 10 rejects with a ValueError; keep at least 1 bit (a near-black image either way)."""
    for t in getattr(tf, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "") == "PosterizeIncreasing":
                op.level_fn = _AtLeastOneBit(op.level_fn)


class _AtLeastOneBit:
    """Picklable wrapper (DataLoader workers) clamping posterize's bit count to >= 1."""

    def __init__(self, level_fn):
        self.level_fn = level_fn

    def __call__(self, level, hparams):
        return (max(1, self.level_fn(level, hparams)[0]),)


def eval_transform(img_size: int, in_chans: int = 3, crop_pct: float | None = None) -> Callable:
    """Resize to ``img_size / crop_pct`` (bicubic) and center-crop ``img_size``.

    ``crop_pct`` None picks the recipe's value: 0.875 for 64 <= size < 384; 1.0 (a plain resize,
    no crop) at 384 and above (as the official evaluation does) and below 64 px, where images
    such as Fashion-MNIST's 28x28 have no border to spare.
    """
    mean, std = mean_std(in_chans)
    if crop_pct is None:
        crop_pct = EVAL_CROP_PCT if 64 <= img_size < 384 else 1.0
    ops: list = [ToMode(in_chans)]
    if crop_pct >= 1.0:
        ops.append(T.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC))
    else:
        ops += [T.Resize(int(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
                T.CenterCrop(img_size)]
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def denormalize(x: torch.Tensor, in_chans: int | None = None) -> torch.Tensor:
    """Undo the normalisation of a (N, C, H, W) batch, clamped to [0, 1] (for image grids)."""
    mean, std = mean_std(in_chans or x.shape[1])
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)
