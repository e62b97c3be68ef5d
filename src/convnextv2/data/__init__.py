"""Datasets and transforms: the built-in Fashion-MNIST subset, IDX folders, ImageFolder trees,
plain image folders and CSV/TSV file lists, all behind ``build_dataset``; WebDataset tar
shards, streamed for training, in ``shards`` (``open_shards``, ``is_shard_source``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .datasets import (IMAGE_EXTENSIONS, ArrayDataset, CorruptImageError, EmptyClassError,
                       ImageFolderDataset, ImageListDataset, IndexedDataset)
from .image_limits import open_image, to_8bit
from .filelist import FileListDataset, is_file_list, val_list_for
from .idx import find_idx_pair, is_idx_folder, read_idx, write_idx
from .transforms import (GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, denormalize,
                         eval_transform, mean_std, pretrain_transform, train_transform)

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation", "test"),
                  "test": ("test", "val", "validation")}

__all__ = ["build_dataset", "IndexedDataset", "ArrayDataset", "ImageFolderDataset",
           "ImageListDataset", "CorruptImageError", "pretrain_transform", "train_transform",
           "eval_transform", "denormalize", "mean_std", "FASHION_MNIST_CLASSES", "BUILTIN_DIR",
           "IMAGENET_MEAN", "IMAGENET_STD", "GRAY_MEAN", "GRAY_STD", "IMAGE_EXTENSIONS",
           "read_idx", "write_idx", "find_idx_pair", "describe_source", "EmptyClassError",
           "open_image", "to_8bit", "count_skipped", "image_files", "FileListDataset",
           "first_items"]


def build_dataset(source: str | Path, split: str = "train", transform: Callable | None = None,
                  strict: bool = False, labelled: bool | None = None):
    """Open ``source`` as a dataset of ``(image, target)`` pairs with a ``.classes`` list.

    ``source``:
      - ``"builtin"``: the packaged Fashion-MNIST subset (10k train / 2k test, 28x28 gray);
      - a folder of IDX files (``train-images-idx3-ubyte[.gz]`` ...), e.g. Fashion-MNIST
        from ``/usr/share/datasets/fashion-mnist``;
      - an ImageFolder tree with ``train/`` and ``val/`` (or ``test/``) subfolders: ``split``
        picks one; a tree with ``train/`` alone serves the train split (pretraining needs no
        more) and names the missing ``val/`` when the val split is asked for;
      - an ImageFolder root (``root/<class>/<image>``), used whatever the split;
      - a plain folder of images: unlabelled (targets 0, ``classes == []``), for pretraining;
      - a ``.csv`` / ``.tsv`` list of ``path,label`` rows (``data/filelist.py``); its val
        split is the list named with ``val`` for ``train`` (``train.csv`` -> ``val.csv``).
    Tar shards are streamed, not indexed: ``shards.open_shards`` reads them (this refuses them).
    ``split``: ``train`` or ``val`` (``test`` is a synonym). ``labelled=True`` rejects the
    unlabelled case; ``False`` treats any image folder as unlabelled. Unreadable images are
    skipped with a warning and counted in ``.num_skipped`` (``strict=True`` raises instead).
    """
    if split not in _SPLIT_FOLDERS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    if str(source) == "builtin":
        return _idx_dataset(BUILTIN_DIR, split, transform, FASHION_MNIST_CLASSES)
    if is_file_list(source):
        path = Path(source).expanduser()
        return FileListDataset(path if split == "train" else val_list_for(path), transform,
                               strict, labelled=bool(labelled))
    from .shards import is_shard_source
    if is_shard_source(source):
        raise ValueError(f"--data {source}: tar shards are read by pretrain and finetune only; "
                         f"here give an image folder, a .csv/.tsv list, an IDX folder or "
                         f"'builtin'")
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist (give a folder of images, "
                                f"an ImageFolder tree, an IDX folder, or 'builtin')")
    if not root.is_dir():
        raise ValueError(f"--data must be a folder or 'builtin', got the file {root}")
    if is_idx_folder(root):
        classes = FASHION_MNIST_CLASSES if "fashion" in str(root).lower() else None
        return _idx_dataset(root, split, transform, classes)
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not subdirs and not any(root.iterdir()):
        raise FileNotFoundError(f"data folder {root} is empty")
    if labelled is False:
        return ImageListDataset(root, transform, strict)
    names = {d.name for d in subdirs}
    if "train" in names:
        for name in _SPLIT_FOLDERS[split]:
            if name in names:
                return _image_folder(root / name, transform, strict, labelled)
        raise FileNotFoundError(f"{root} has train/ but no val/ folder (validation/ and test/ "
                                f"are accepted too): the {split} split needs "
                                f"{root / 'val'}/<class>/<image>")
    if subdirs and _has_class_folders(root, subdirs):
        return ImageFolderDataset(root, transform, strict)
    if labelled:
        raise ValueError(f"{root} has no class subfolders; a labelled dataset needs "
                         f"root/<class>/<image>, root/train/<class>/<image> or IDX files")
    return ImageListDataset(root, transform, strict)


def count_skipped(*datasets) -> int:
    """Images skipped so far by ``datasets`` (wrapped in ``Subset`` or ``IndexedDataset`` or
    not), counted across DataLoader worker processes. Read it after the epochs, not before:
    files that fail only when decoded are found while training."""
    total = 0
    for ds in datasets:
        while not hasattr(ds, "num_skipped") and hasattr(ds, "dataset"):
            ds = ds.dataset  # torch's Subset does not forward attributes
        total += int(getattr(ds, "num_skipped", 0))
    return total


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (by extension; hidden files left out), sorted."""
    from .datasets import _image_files
    return _image_files(Path(folder))


def first_items(dataset, n: int) -> list:
    """The first ``n`` items of a dataset, indexed (map-style) or streamed (tar shards)."""
    from itertools import islice

    from torch.utils.data import IterableDataset
    if isinstance(dataset, IterableDataset):
        return list(islice(iter(dataset), n))
    return [dataset[i] for i in range(min(n, len(dataset)))]


def describe_source(source: str | Path) -> str:
    return "built-in Fashion-MNIST subset" if str(source) == "builtin" else str(source)


def _image_folder(folder: Path, transform, strict, labelled):
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if subdirs:
        return ImageFolderDataset(folder, transform, strict)
    if labelled:
        raise ValueError(f"{folder} has no class subfolders (expected {folder}/<class>/<image>)")
    return ImageListDataset(folder, transform, strict)


def _has_class_folders(root: Path, subdirs) -> bool:
    """True when images sit one level down (root/<class>/<image>) rather than at the top."""
    top_images = any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())
    return not top_images


def _idx_dataset(folder: Path, split: str, transform, classes):
    images_path, labels_path = find_idx_pair(folder, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim not in (3, 4) or labels.ndim != 1:
        raise ValueError(f"{images_path}: expected images (N, H, W[, C]) and labels (N,), got "
                         f"{images.shape} and {labels.shape}")
    if classes is None:
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    return ArrayDataset(images, labels, classes, transform)
