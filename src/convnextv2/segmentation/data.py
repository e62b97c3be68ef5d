"""Semantic segmentation data in ADE20K's layout and label convention.

Layout: ``ROOT/images/<split>/*.jpg|png`` and ``ROOT/annotations/<split>/<same stem>.png``,
with ``<split>`` ``training`` or ``validation`` (``train``/``val`` are accepted too). Mask PNGs
hold one class index per pixel. With ``reduce_zero_label`` (ADE20K's convention, on by
default) value 0 means "ignore" and values 1..K are the K classes: they become 255 and
0..K-1. Class names come from ``ROOT/classes.txt`` (one per line), ADE20K's
``objectInfo150.txt``, or just a count.

Opening the dataset checks that every image has its mask and that their sizes agree (PIL reads
only the headers; images above the pixel limit of ``data/image_limits.py`` are refused there);
a mask value outside the class range is reported when the mask is loaded. Images go through
the shared opener (16-bit scaled to 8 bits); masks are read as they are (class indices).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..data.image_limits import image_size, open_image
from ..transfer.errors import DataError
from .model import IGNORE_INDEX

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_NAMES = {"train": ("training", "train"), "val": ("validation", "val")}


def read_class_names(root: str | Path, reduce_zero_label: bool = True) -> list[str] | None:
    """Class names from ``classes.txt`` or ADE20K's ``objectInfo150.txt``, or None.
    ``classes.txt`` lists the K classes whose mask values are 1..K (0..K-1 without
    ``reduce_zero_label``)."""
    root = Path(root)
    plain = root / "classes.txt"
    if plain.is_file():
        return [line.strip() for line in plain.read_text().splitlines() if line.strip()]
    info = root / "objectInfo150.txt"
    if info.is_file():  # columns: Idx Ratio Train Val Name ("wall", "building;edifice" ...)
        rows = info.read_text().splitlines()[1:]
        return [r.split("\t")[-1].split(";")[0].strip() for r in rows if r.strip()]
    return None


def split_folder(root: Path, kind: str, split: str) -> Path:
    for name in SPLIT_NAMES[split]:
        if (root / kind / name).is_dir():
            return root / kind / name
    raise FileNotFoundError(f"{root} has no {kind}/{SPLIT_NAMES[split][0]} folder (expected "
                            f"the ADE20K layout: images/ and annotations/, each with training/ "
                            f"and validation/)")


class SegmentationFolder(Dataset):
    """``(image, mask)`` pairs: float image (3, H, W) in 0-1 and int64 mask (H, W) with classes
    0..K-1 and ``IGNORE_INDEX`` (255), after ``transforms`` (torchvision v2, joint)."""

    def __init__(self, root: str | Path, split: str = "train", transforms=None,
                 num_classes: int | None = None, reduce_zero_label: bool = True):
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist")
        self.reduce_zero_label, self.transforms = reduce_zero_label, transforms
        names = read_class_names(self.root)
        if num_classes is None and names is None:
            raise ValueError(f"{self.root}: no classes.txt or objectInfo150.txt; give the class "
                             f"count (--num-classes)")
        self.num_classes = int(num_classes or len(names))
        self.classes = (names if names and len(names) == self.num_classes
                        else [str(i) for i in range(self.num_classes)])
        img_dir, ann_dir = split_folder(self.root, "images", split), \
            split_folder(self.root, "annotations", split)
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{img_dir} holds no images")
        self.samples = []
        for image in images:
            mask = ann_dir / f"{image.stem}.png"
            if not mask.is_file():
                raise DataError(f"{image}: its mask {mask} is missing")
            isize, msize = image_size(image), image_size(mask)  # headers, and the size limit
            if isize != msize:
                raise DataError(f"{mask} is {msize[0]}x{msize[1]} but its image {image.name} is "
                                f"{isize[0]}x{isize[1]}")
            self.samples.append((image, mask))

    def __len__(self) -> int:
        return len(self.samples)

    def load_mask(self, index: int) -> np.ndarray:
        """The mask with classes 0..K-1 and 255 for ignore; raises on out-of-range values."""
        path = self.samples[index][1]
        raw = np.asarray(open_image(path, scale_16bit=False))  # class indices, not light
        if raw.ndim != 2:
            raise DataError(f"{path}: a mask PNG must have one channel of class indices "
                            f"(mode L or P), got shape {raw.shape}")
        mask = raw.astype(np.int64)
        if self.reduce_zero_label:
            mask = np.where(raw == 0, IGNORE_INDEX, mask - 1)
            mask[raw == 255] = IGNORE_INDEX
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            values = sorted(set(raw[bad].tolist()))[:5]
            allowed = (f"1..{self.num_classes} (0 = ignore)" if self.reduce_zero_label
                       else f"0..{self.num_classes - 1} (255 = ignore)")
            raise DataError(f"{path}: label value(s) {values} outside the class range; with "
                            f"{self.num_classes} classes masks may hold {allowed}")
        return mask

    def __getitem__(self, index: int):
        image_path, _ = self.samples[index]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(open_image(image_path, "RGB")))
        mask = tv_tensors.Mask(torch.from_numpy(self.load_mask(index)))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def train_transforms(crop: int, scale: tuple[int, int] | None = None,
                     ratio_range: tuple[float, float] = (0.5, 2.0), photometric: bool = True):
    """The ADE20K training pipeline: random rescale (``scale`` (short, long) edge targets,
    default (crop, 4 * crop), times a factor in ``ratio_range``), random ``crop`` x ``crop``
    crop (padded with ignore where the image is smaller), horizontal flip, colour jitter."""
    short, long = scale or (crop, 4 * crop)
    steps = [v2.ToImage(),
             v2.ScaleJitter((short, long), scale_range=tuple(ratio_range), antialias=True),
             v2.RandomCrop((crop, crop), pad_if_needed=True,
                           fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
             v2.RandomHorizontalFlip()]
    if photometric:
        steps.append(v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05))
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    return v2.Compose(steps)


def eval_transforms(size: int | None = None):
    """Test images scaled so their shorter edge is ``size`` (None: as they are); masks stay at
    the original size, and predictions are resized back to it before scoring."""
    steps = [v2.ToImage()]
    if size:
        steps.append(_ResizeImageOnly(size))
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    return v2.Compose(steps)


class _ResizeImageOnly(v2.Transform):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Image):
            return v2.functional.resize(inpt, self.size, antialias=True)
        return inpt


def collate(batch):
    """Stack same-sized samples; masks of differing sizes are padded with ignore."""
    images, masks = zip(*batch)
    h = max(m.shape[-2] for m in masks)
    w = max(m.shape[-1] for m in masks)
    if any(im.shape != images[0].shape for im in images):
        raise ValueError("evaluation images of different sizes need --eval-batch-size 1")
    out = torch.full((len(masks), h, w), IGNORE_INDEX, dtype=torch.int64)
    for i, m in enumerate(masks):
        out[i, :m.shape[-2], :m.shape[-1]] = m
    return torch.stack(images), out
