"""Dataset classes: in-memory arrays (IDX files), ImageFolder trees and plain image folders.

Every dataset exposes ``.classes`` (a list of names; empty for unlabelled folders) and
``.num_skipped`` / ``.skipped`` (images that could not be read, so training can log them).

Two details that are easy to get wrong:

- Skips found while decoding happen in DataLoader worker processes, which share no Python
  objects with the main process. The record of failed samples is therefore a one-byte-per-
  sample tensor in shared memory, written by whichever process meets the failure and read by
  the main process: ``num_skipped`` is right with ``workers > 0`` too.
- Files are opened by ``image_limits.open_image``, the opener every reader shares: oversized
  images are refused by their header, and 16-bit images are scaled to 8 bits (divided by 257;
  Pillow's own ``convert("L")`` clips them, which turns almost every pixel white).

Warnings go to the ``convnextv2.data`` logger as one line each (no Python source location,
unlike ``warnings.warn``); without logging configured, Python prints them on stderr.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .image_limits import (READ_ERRORS, ImageTooLargeError, UnreadableImageError, image_size,
                           open_image)

log = logging.getLogger("convnextv2.data")
_said: set[str] = set()  # scan warnings already given in this process


def _warn_once(message: str) -> None:
    """Log a scan warning once per process: recipes may open the same folder twice (e.g. for
    the figures and for training), and the same line twice reads like two problems."""
    if message not in _said:
        _said.add(message)
        log.warning(message)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
_BAD_IMAGE_ERRORS = READ_ERRORS


class CorruptImageError(ValueError):
    """An unreadable image met with ``strict=True``."""


class EmptyClassError(ValueError):
    """A class folder without images, met with ``strict=True``."""


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
    next readable one and flagged in a shared-memory record, so the count survives worker
    processes. With ``strict=True`` both cases raise.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str],
                 transform: Callable | None, strict: bool, root: Path):
        self.root, self.classes, self.transform, self.strict = root, classes, transform, strict
        self._unreadable: list[str] = []  # found by the scan, in this (the main) process
        good = []
        for path, target in samples:
            problem = _check_image(path)
            if problem is None:
                good.append((path, target))
            elif strict:
                raise CorruptImageError(problem)
            else:
                self._unreadable.append(str(path))
        if self._unreadable:
            _warn_once(f"warning: {root}: skipped {len(self._unreadable)} unreadable "
                       f"image(s), e.g. {self._unreadable[0]}")
        if not good:
            raise FileNotFoundError(f"{root}: no readable images (extensions: "
                                    f"{', '.join(IMAGE_EXTENSIONS)})")
        self.samples = good
        self.targets = [t for _, t in good]
        # 1 where a sample failed to decode; shared with (forked or spawned) DataLoader workers
        self._decode_failed = torch.zeros(len(good), dtype=torch.uint8).share_memory_()

    @property
    def skipped(self) -> list[str]:
        """Every file skipped so far: by the scan, and while decoding in any process."""
        failed = self._decode_failed.nonzero().flatten().tolist()
        return self._unreadable + [str(self.samples[i][0]) for i in failed]

    @property
    def num_skipped(self) -> int:
        return len(self._unreadable) + int(self._decode_failed.sum())

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[Image.Image, int]:
        for step in range(len(self.samples)):
            j = (i + step) % len(self.samples)
            path, target = self.samples[j]
            try:
                return open_image(path), target
            except _BAD_IMAGE_ERRORS as e:
                if self.strict:
                    raise CorruptImageError(describe_failure(path, e)) from None
                if not self._decode_failed[j]:
                    self._decode_failed[j] = 1
                    log.warning("warning: skipping %s", describe_failure(path, e))
        raise CorruptImageError(f"{self.root}: no image could be decoded")

    def __getitem__(self, i: int):
        img, target = self.load(i)
        return (self.transform(img) if self.transform else img), target


class ImageFolderDataset(_FileDataset):
    """``root/<class name>/<image>``; classes sorted by name, labels are their indices.

    An empty class folder keeps its place in ``classes`` (so the labels of train and val stay
    aligned) and is named in a warning: a class the model can never learn is a data mistake
    worth seeing. ``strict=True`` refuses it.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, strict: bool = False):
        root = Path(root)
        classes = sorted(d.name for d in root.iterdir()
                         if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"{root}: no class subfolders (expected root/<class>/<image>)")
        files = {name: _image_files(root / name) for name in classes}
        samples = [(p, c) for c, name in enumerate(classes) for p in files[name]]
        if not samples:
            raise FileNotFoundError(f"{root}: the class folders {classes[:5]} hold no images")
        empty = [name for name in classes if not files[name]]
        if empty and strict:
            raise EmptyClassError(f"{root}: class folder(s) without images: {', '.join(empty)} "
                                  f"(--strict-data refuses them; add images or remove the folder)")
        if empty:
            _warn_once(f"warning: {root}: class folder(s) without images: {', '.join(empty)}")
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


def describe_failure(path, error: BaseException) -> str:
    """One line naming the file and why it cannot be used (the opener's own errors already
    name it)."""
    if isinstance(error, (ImageTooLargeError, UnreadableImageError)):
        return str(error)
    return f"unreadable image {path}: {error or type(error).__name__}"


def _check_image(path: Path) -> str | None:
    """None if the file looks like a readable image, else one line naming it and why not."""
    try:
        if path.stat().st_size == 0:
            return f"unreadable image {path}: empty file"
        image_size(path)  # the header, and the size limit
        with Image.open(path) as img:
            img.verify()
    except _BAD_IMAGE_ERRORS as e:
        return describe_failure(path, e)
    return None
