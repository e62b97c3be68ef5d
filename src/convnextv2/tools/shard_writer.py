"""Writing WebDataset tar shards from an ImageFolder tree, a plain folder or IDX data.

What ``convnextv2 shards SRC OUT --shard-size N`` does, and why:

- Each sample is ``KEY.<ext>`` (the image file's own bytes, not re-encoded; IDX arrays are
  encoded as PNG), ``KEY.cls`` (the class index as text) and ``KEY.class.txt`` (the class
  name); unlabelled folders give the image alone. ``KEY`` is the sample's place in the
  source's order (class folders sorted, then files sorted), so it leads back to the file.
- The order within the shards is that order permuted by ``seed``: a shard read front to back
  then holds a mix of classes (a shuffle buffer alone cannot mix class-sorted shards), and
  the same source and seed always give byte-identical shards (tar headers carry no time or
  owner).
- ``shards.json`` beside the shards records each shard's sample count and size, the classes
  and the source, so readers need not scan the tar headers.
- A tree with ``train/`` and ``val/`` (or ``builtin``, an IDX folder, a ``train.csv`` list
  with its ``val.csv``) gives ``OUT/train`` and ``OUT/val``; anything else gives the shards
  directly in ``OUT``. A list's labels are kept (``labelled`` lists only).
- Atomic: everything is written into a hidden temp folder beside ``OUT`` and renamed into
  place at the end; an error or interrupt leaves no half-written shards. An ``OUT`` that holds
  files is refused, or with ``overwrite`` moved aside to ``OUT.old-<time>`` (nothing deleted).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import build_dataset, describe_source
from ..data.datasets import ArrayDataset, _FileDataset
from ..data.filelist import is_file_list, val_list_for
from ..data.shards import SHARD_INDEX

INDEX_FORMAT = "convnextv2-shards/1"


def plan_splits(source: str) -> dict[str, str]:
    """{sub-folder of OUT ("" for OUT itself): split} for ``source``."""
    if str(source) == "builtin":
        return {"train": "train", "val": "val"}
    root = Path(source).expanduser()
    if is_file_list(root) and root.is_file():
        try:
            val_list_for(root)
        except FileNotFoundError:
            return {"": "train"}
        return {"train": "train", "val": "val"}
    if not root.is_dir():
        raise FileNotFoundError(f"SRC {source}: no such folder (give an ImageFolder tree, a "
                                f"folder of images, a .csv/.tsv list, an IDX folder or "
                                f"'builtin')")
    from ..data.idx import is_idx_folder
    if is_idx_folder(root):
        return {"train": "train", "val": "val"}
    names = {d.name for d in root.iterdir() if d.is_dir()}
    if "train" in names and names & {"val", "validation", "test"}:
        return {"train": "train", "val": "val"}
    return {"": "train"}


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse an ``OUT`` holding files (without ``overwrite``) or that is a file."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"OUT {out} is a file; give a folder for the shards")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"OUT {out} is not empty; pick a new folder or pass --overwrite "
                              f"(the old contents are moved to {out.name}.old-<time>)")


def write_shards(source: str, out: str | Path, shard_size: int, *, seed: int = 0,
                 shuffle: bool = True, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the shards of ``source`` into ``out``; returns {split: index dict}."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out).expanduser()
    check_destination(out, overwrite)
    splits = plan_splits(source)
    datasets = {sub: build_dataset(source, split, labelled=True if is_file_list(source) else None)
                for sub, split in splits.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        written = {}
        for sub, ds in datasets.items():
            folder = tmp / sub if sub else tmp
            folder.mkdir(exist_ok=True)
            prefix = sub or "shards"
            written[sub or "."] = _write_split(ds, folder, prefix, shard_size, seed, shuffle,
                                               describe_source(source), progress)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        from ..training.output import aside_name
        out.rename(aside_name(out))
    elif out.is_dir():
        out.rmdir()
    os.replace(tmp, out)
    tmp_mode = 0o777 & ~_umask()
    os.chmod(out, tmp_mode)  # mkdtemp makes a private folder; shards are meant to be shared


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_split(ds, folder: Path, prefix: str, shard_size: int, seed: int, shuffle: bool,
                 source: str, progress: bool) -> dict:
    n = len(ds)
    order = (np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)).tolist()
    labelled = bool(ds.classes)
    digits = max(6, len(str(n)))
    shards = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"shards {prefix}", unit="img", dynamic_ncols=True)
    try:
        for number, start in enumerate(range(0, n, shard_size)):
            name = f"{prefix}-{number:06d}.tar"
            chunk = order[start:start + shard_size]
            with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in chunk:
                    data, ext, target = _sample_bytes(ds, i)
                    key = f"{i:0{digits}d}"
                    _add(tar, f"{key}.{ext}", data)
                    if labelled:
                        _add(tar, f"{key}.cls", str(target).encode())
                        _add(tar, f"{key}.class.txt", ds.classes[target].encode())
                    if bar is not None:
                        bar.update(1)
            shards.append(dict(name=name, samples=len(chunk),
                               bytes=(folder / name).stat().st_size))
    finally:
        if bar is not None:
            bar.close()
    index = dict(format=INDEX_FORMAT, source=source, split=prefix, samples=n,
                 labelled=labelled, classes=list(ds.classes), shuffled_with_seed=seed if
                 shuffle else None, shards=shards)
    (folder / SHARD_INDEX).write_text(json.dumps(index, indent=1))
    return index


def _sample_bytes(ds, i: int) -> tuple[bytes, str, int]:
    """(image bytes, extension, class index) of sample ``i``: a file's own bytes, or an
    in-memory image encoded as PNG (lossless)."""
    if isinstance(ds, _FileDataset):
        path, target = ds.samples[i]
        ext = path.suffix.lower().lstrip(".")
        return path.read_bytes(), ("jpg" if ext == "jpeg" else ext), target
    if isinstance(ds, ArrayDataset):
        buf = io.BytesIO()
        Image.fromarray(ds.images[i]).save(buf, format="PNG")
        return buf.getvalue(), "png", ds.targets[i]
    raise TypeError(f"cannot write shards from {type(ds).__name__}")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A member with fixed metadata (no time, owner or group): same input, same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
