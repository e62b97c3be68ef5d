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
from torchvision.transforms.v2 import functional as TF

from ..data.image_limits import image_size, open_image
from ..transfer.errors import DataError
from .model import IGNORE_INDEX
from .transforms import eval_transforms, train_transforms  # noqa: F401  (the pipelines)

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
    0..K-1 and ``IGNORE_INDEX`` (255), after ``transforms`` (``transforms.py``, joint: they take
    a uint8 image tensor and the mask). Without transforms: the uint8 image."""

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

    def check_masks(self, workers: int = 0) -> None:
        """Read every mask now (with ``workers`` processes), so a bad one (out-of-range value,
        truncated file) stops the run before training rather than at its first evaluation,
        after steps that would then be lost. Meant for the validation split: it is small."""
        from torch.utils.data import DataLoader

        loader = DataLoader(_MaskReader(self), batch_size=None, num_workers=workers)
        for _ in loader:
            pass

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
        image = TF.pil_to_tensor(open_image(image_path, "RGB"))
        mask = torch.from_numpy(self.load_mask(index))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask.long()


class _MaskReader(Dataset):
    """The masks of a ``SegmentationFolder`` alone (``check_masks``)."""

    def __init__(self, folder: SegmentationFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> int:
        self.folder.load_mask(index)
        return index


def collate(batch):
    """Training batches: same-sized samples (crops) stacked."""
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack(masks)


def collate_eval(batch):
    """Evaluation batches: images stacked where their sizes agree, else a list, and the masks
    always a list at each image's own size, so each prediction is scored at its own size
    (never stretched over a padded batch)."""
    images, masks = zip(*batch)
    same = all(im.shape == images[0].shape for im in images)
    return (torch.stack(images) if same else list(images)), list(masks)
