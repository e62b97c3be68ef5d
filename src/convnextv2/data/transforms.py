"""Image transforms for pretraining, fine-tuning and evaluation.

Channels: ``in_chans=1`` converts every image to mode ``L``; ``in_chans=3`` converts to
``RGB`` (a grayscale image is replicated to three channels). Normalisation: ImageNet's
mean/std for 3 channels; for 1 channel the average of ImageNet's three values, mean 0.449 and
std 0.226, so a grayscale image gets nearly the same normalised values whether it is fed as 1
channel or replicated to 3 (and a model can move between the two by summing its stem weights).

Small images (``img_size`` of 32 px or less, e.g. CIFAR or Fashion-MNIST): the official
fine-tuning code replaces RandomResizedCrop with ``RandomCrop(size, padding=4)`` and evaluates
without any resize, because cropping 8-100 % of a 28-32 px image and scaling it back up destroys
most of what little there is. We follow that rule automatically (``small_image=None``), and
since Fashion-MNIST is 28 px for a 32 px model, an image smaller than the model's input is
zero-padded to it (centered) instead of enlarged. Only an image *larger* than a small target is
scaled down (bicubic, short side, then center crop): there is no other way to fit it.
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
SMALL_IMAGE_MAX = 32      # the official small-image rule applies up to this input size
SMALL_IMAGE_PADDING = 4


def is_small_image(img_size: int) -> bool:
    """Whether ``img_size`` falls under the small-image rule (see the module docstring)."""
    return img_size <= SMALL_IMAGE_MAX


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


class FitToSize:
    """Bring a PIL image to ``size`` x ``size`` without enlarging it: a smaller side is
    zero-padded (centered), a larger image is scaled down (bicubic, short side) and
    center-cropped. A 28 px Fashion-MNIST digit thus keeps its pixels inside a 32 px frame."""

    def __init__(self, size: int, fill: int = 0):
        self.size, self.fill = size, fill

    def __call__(self, img):
        w, h = img.size
        if min(w, h) > self.size:
            img = T.functional.resize(img, self.size, interpolation=InterpolationMode.BICUBIC)
            w, h = img.size
        if w > self.size or h > self.size:
            img = T.functional.center_crop(img, [min(h, self.size), min(w, self.size)])
            w, h = img.size
        if w < self.size or h < self.size:
            left, top = (self.size - w) // 2, (self.size - h) // 2
            img = T.functional.pad(img, [left, top, self.size - w - left, self.size - h - top],
                                   fill=self.fill)
        return img

    def __repr__(self):
        return f"FitToSize(size={self.size}, pad=centered zeros, larger images: bicubic)"


class SmallImageCrop:
    """The small-image training crop: ``FitToSize`` then ``RandomCrop(size, padding=4)``
    (zero fill), i.e. shifts of up to 4 px instead of RandomResizedCrop's zoom."""

    def __init__(self, size: int, padding: int = SMALL_IMAGE_PADDING):
        self.fit = FitToSize(size)
        self.crop = T.RandomCrop(size, padding=padding)
        self.size, self.padding = size, padding

    def __call__(self, img):
        return self.crop(self.fit(img))

    def __repr__(self):
        return (f"SmallImageCrop(size={self.size}, padding={self.padding}, "
                f"larger images: interpolation=bicubic)")


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
                    interpolation: str = "bicubic",
                    small_image: bool | None = None) -> Callable:
    """Fine-tuning recipe through timm: RandomResizedCrop, flip, RandAugment
    ``rand-m9-mstd0.5-inc1``, random erasing 0.25 (per-pixel noise), bicubic. ``auto_augment``
    None or "none" disables RandAugment (color jitter is only used then, as in timm).

    ``small_image`` (None: ``img_size <= 32``): RandomResizedCrop is replaced by
    ``SmallImageCrop`` (pad to size, ``RandomCrop(size, padding=4)``), the official rule for
    small inputs; ``scale`` is then unused. Everything after the crop is unchanged."""
    from timm.data import create_transform

    mean, std = mean_std(in_chans)
    if auto_augment in ("", "none", "None"):
        auto_augment = None
    tf = create_transform(
        input_size=(in_chans, img_size, img_size), is_training=True, scale=scale, hflip=hflip,
        color_jitter=color_jitter or 0.0, auto_augment=auto_augment,
        interpolation=interpolation, mean=mean, std=std, re_prob=reprob, re_mode=remode,
        re_count=recount)
    if small_image is None:
        small_image = is_small_image(img_size)
    if small_image:
        if "RandomResizedCrop" not in type(tf.transforms[0]).__name__:  # timm's own class
            raise RuntimeError(f"unexpected first training transform {tf.transforms[0]!r}")
        tf.transforms[0] = SmallImageCrop(img_size)
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


def default_crop_pct(img_size: int) -> float:
    """The evaluation crop ratio the recipe uses at ``img_size`` (see ``eval_transform``)."""
    return EVAL_CROP_PCT if 64 <= img_size < 384 else 1.0


def eval_transform(img_size: int, in_chans: int = 3, crop_pct: float | None = None,
                   small_image: bool | None = None) -> Callable:
    """Resize to ``img_size / crop_pct`` (bicubic) and center-crop ``img_size``.

    ``crop_pct`` None picks the recipe's value: 0.875 for 64 <= size < 384; 1.0 (a plain resize,
    no crop) at 384 and above (as the official evaluation does) and between 33 and 63 px, where
    images have no border to spare. ``small_image`` (None: ``img_size <= 32`` and no explicit
    ``crop_pct``) applies the small-image rule instead: no resize, ``FitToSize`` (a 28 px image
    is zero-padded to 32; only larger images are scaled down), matching ``train_transform``.
    """
    mean, std = mean_std(in_chans)
    if small_image is None:
        small_image = is_small_image(img_size) and crop_pct is None
    if small_image:
        return T.Compose([ToMode(in_chans), FitToSize(img_size), T.ToTensor(),
                          T.Normalize(mean, std)])
    if crop_pct is None:
        crop_pct = default_crop_pct(img_size)
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
