"""Reading and writing IDX files (the MNIST / Fashion-MNIST container), plain or gzipped.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of dimensions), one
big-endian uint32 per dimension, then the array in C order, big-endian.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}

# file stems per split; torchvision and the Debian package both use these names
_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file; a clear error for a truncated or foreign file."""
    path = Path(path)
    with _open(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _DTYPES[data[2]]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: truncated or oversized IDX file: shape {shape} needs "
                         f"{expected} bytes of data, found {len(data) - header}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as IDX; a ``.gz`` suffix gzips it with mtime 0 (reproducible bytes)."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"dtype {array.dtype} has no IDX code")
    payload = bytes([0, 0, code, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape) + array.astype(_DTYPES[code]).tobytes()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                    filename="", compresslevel=9) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def find_idx_pair(folder: Path, split: str) -> tuple[Path, Path]:
    """(images, labels) paths for ``split`` ('train' or 'test'/'val') in an IDX folder."""
    split = "test" if split in ("val", "test", "t10k") else split
    if split not in _STEMS:
        raise ValueError(f"unknown split {split!r} for an IDX dataset; use 'train' or 'test'")
    found = []
    for stem in _STEMS[split]:
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            if (folder / name).is_file():
                found.append(folder / name)
                break
        else:
            raise FileNotFoundError(f"{folder}: no {stem}[.gz] file for the {split!r} split")
    return found[0], found[1]


def is_idx_folder(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*-idx[13]-ubyte*"))
