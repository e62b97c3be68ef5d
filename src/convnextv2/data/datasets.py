"""Dataset classes: in-memory arrays (IDX files), ImageFolder trees and plain image folders.

Every dataset exposes ``.classes`` (a list of names; empty for unlabelled folders) and
``.num_skipped`` / ``.skipped`` (images that could not be read, so training can log them).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
_BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


class CorruptImageError(ValueError):
    """An unreadable image met with ``strict=True``."""


class ArrayDataset(Dataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, C), with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.targets = images, [int(t) for t in labels]
        self.classes = list(classes)
        self.transform = transform
        self.skipped: list[str] = []

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


class _FileDataset(Dataset):
    """Shared logic for datasets backed by image files: the scan and the corrupt-file policy.

    At construction every file is opened and ``verify()``-ed (cheap: header and, for PNG, the
    checksums) and unreadable ones are dropped with one warning. Files that only fail when
    decoded (a truncated JPEG) are caught in ``__getitem__``: the sample is replaced by the
    next readable one and recorded in ``skipped``. With ``strict=True`` both cases raise.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str],
                 transform: Callable | None, strict: bool, root: Path):
        self.root, self.classes, self.transform, self.strict = root, classes, transform, strict
        self.skipped: list[str] = []
        good = []
        for path, target in samples:
            problem = _check_image(path)
            if problem is None:
                good.append((path, target))
            elif strict:
                raise CorruptImageError(f"unreadable image {path}: {problem}")
            else:
                self.skipped.append(str(path))
        if self.skipped:
            warnings.warn(f"{root}: skipped {len(self.skipped)} unreadable image(s), e.g. "
                          f"{self.skipped[0]}", stacklevel=3)
        if not good:
            raise FileNotFoundError(f"{root}: no readable images (extensions: "
                                    f"{', '.join(IMAGE_EXTENSIONS)})")
        self.samples = good
        self.targets = [t for _, t in good]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[Image.Image, int]:
        for step in range(len(self.samples)):
            path, target = self.samples[(i + step) % len(self.samples)]
            try:
                with Image.open(path) as img:
                    img.load()
                    return img.copy(), target
            except _BAD_IMAGE_ERRORS as e:
                if self.strict:
                    raise CorruptImageError(f"unreadable image {path}: {e}") from None
                if str(path) not in self.skipped:
                    self.skipped.append(str(path))
                    warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
        raise CorruptImageError(f"{self.root}: no image could be decoded")

    def __getitem__(self, i: int):
        img, target = self.load(i)
        return (self.transform(img) if self.transform else img), target


class ImageFolderDataset(_FileDataset):
    """``root/<class name>/<image>``; classes sorted by name, labels are their indices."""

    def __init__(self, root: str | Path, transform: Callable | None = None, strict: bool = False):
        root = Path(root)
        classes = sorted(d.name for d in root.iterdir()
                         if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"{root}: no class subfolders (expected root/<class>/<image>)")
        samples = [(p, c) for c, name in enumerate(classes) for p in _image_files(root / name)]
        if not samples:
            raise FileNotFoundError(f"{root}: the class folders {classes[:5]} hold no images")
        super().__init__(samples, classes, transform, strict, root)


class ImageListDataset(_FileDataset):
    """Every image below ``root`` (recursively), unlabelled: targets are all 0 (pretraining)."""

    def __init__(self, root: str | Path, transform: Callable | None = None, strict: bool = False):
        root = Path(root)
        files = _image_files(root, recursive=True)
        if not files:
            raise FileNotFoundError(f"{root}: no image files found (extensions: "
                                    f"{', '.join(IMAGE_EXTENSIONS)})")
        super().__init__([(p, 0) for p in files], [], transform, strict, root)


class IndexedDataset(Dataset):
    """Wraps a dataset so each item is ``(img, target, index)`` (per-sample bookkeeping)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, target = self.dataset[i]
        return img, target, i

    def __getattr__(self, name):  # .classes, .num_skipped, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _check_image(path: Path) -> str | None:
    """None if the file looks like a readable image, else the reason."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.verify()
    except _BAD_IMAGE_ERRORS as e:
        return str(e) or type(e).__name__
    return None
