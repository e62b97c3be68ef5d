"""WebDataset tar shards as training data, read as a stream with the ``webdataset`` package.

At ImageNet scale on network storage, opening millions of small files is the bottleneck; a
few hundred tar files read front to back are not. ``--data`` takes shards as

- a brace pattern: ``/data/in1k-train-{000000..001023}.tar``;
- a single ``.tar`` file, or a folder of ``.tar`` files (sorted by name); a folder with
  ``train/`` and ``val/`` shard folders (what ``convnextv2 shards`` writes from an ImageFolder
  tree) serves both splits;
- a ``.txt`` list of shard paths, one a line (relative ones relative to the list's folder).

A sample is the tar members sharing a key: one image (``.jpg``, ``.png``, ...), optionally
``.cls`` (the class index, as text) and ``.class.txt`` (its name). The number of samples per
shard comes from the ``shards.json`` index the writer leaves beside the shards (trusted when
the shard's size matches) or from a scan of the tar headers.

How an epoch is split (``ShardDataset.for_training``):

- the shard list is permuted by (seed, epoch); process r of W takes shards r, r + W, ...;
  its loader worker w of K takes every K-th of those. Each shard is read by one worker of
  one process, so every sample is seen once per epoch across all processes when the shards
  divide evenly (same sizes, a multiple of W x K shards); otherwise a one-line warning says so;
- every worker streams its shards through a shuffle buffer seeded by (seed, epoch, rank,
  worker) and starts over (reshuffled) when it runs out, so every process yields the same
  number of batches (``batches_per_epoch``: a W-th of the samples, whole batches) and
  DDP never waits on a process that ran dry;
- each image's augmentation is keyed by (seed, epoch, the sample's global index), as for
  folders (``training.data_order``).

Resume: ``--resume auto`` restarts at the saved epoch. Inside an epoch, the stream is a
function of (seed, epoch, processes, workers, batch size), so a run resumed with the same
ones continues with exactly the batches the interrupted run had not reached; each worker
re-reads (without decoding) the part of its stream already trained on. Resumed with another
number of processes or workers, the rest of that epoch is a different cut of the shards
(some samples repeat, some are missed) and later epochs are whole again.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from .datasets import IMAGE_EXTENSIONS, CorruptImageError, _warn_once
from .image_limits import READ_ERRORS, ImageTooLargeError, check_size, to_8bit

log = logging.getLogger("convnextv2.data")

SHARD_INDEX = "shards.json"   # written beside the shards: sample counts, classes
SHUFFLE_BUFFER = 1000         # samples held per worker to mix the shards' contents
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation", "test")}


class ShardError(ValueError):
    """Shards that cannot be used (bad pattern, no shards, unreadable tar), one line."""


@dataclass(frozen=True)
class Shard:
    path: str
    samples: int
    offset: int  # global index of its first sample: shards are numbered in list order


@dataclass
class ShardSet:
    source: str
    shards: list[Shard]
    classes: list[str]
    labelled: bool

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


# -- finding the shards --------------------------------------------------------------------------
def is_shard_source(source) -> bool:
    """True when ``--data`` names tar shards (pattern, .tar, .txt list, folder of .tar)."""
    text = str(source)
    if text == "builtin":
        return False
    path = Path(text).expanduser()
    if "{" in text or path.suffix == ".tar" or path.suffix == ".txt":
        return True
    if not path.is_dir():
        return False
    return bool(_tars_in(path)) or any(_tars_in(path / name) for names in
                                       _SPLIT_FOLDERS.values() for name in names)


def _tars_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".tar" and p.is_file()
                  and not p.name.startswith("."))


def expand_shards(source, split: str = "train") -> list[Path]:
    """The shard files ``source`` names, in order, for ``split`` (a folder with ``train/`` and
    ``val/`` shard folders picks one; other forms are the train split only)."""
    text = str(source)
    path = Path(text).expanduser()
    if split != "train" and not path.is_dir():
        raise FileNotFoundError(f"--data {text}: tar shards for fine-tuning need a folder with "
                                f"train/ and val/ shard folders (convnextv2 shards writes them "
                                f"from an ImageFolder tree)")
    if "{" in text:
        files = _expand_pattern(text)
    elif path.suffix == ".txt":
        files = _read_list(path)
    elif path.suffix == ".tar":
        files = [path]
    elif path.is_dir():
        files = _folder_shards(path, split)
    else:
        raise FileNotFoundError(f"--data {text}: no such shard folder")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--data {text}: {len(missing)} of {len(files)} shard(s) do not "
                                f"exist, e.g. {missing[0]}")
    return files


def _expand_pattern(text: str) -> list[Path]:
    from webdataset.shardlists import expand_urls

    files = expand_urls(text)
    if any("{" in f or "}" in f for f in files) or text.count("{") != text.count("}"):
        raise ShardError(f"--data {text}: not a brace pattern webdataset can expand (write "
                         f"e.g. shards-{{000000..000009}}.tar)")
    return [Path(f).expanduser() for f in files]


def _read_list(path: Path) -> list[Path]:
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: shard list does not exist (a .txt file with "
                                f"one .tar path a line)")
    files = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.endswith(".tar"):
            raise ShardError(f"{path}:{n}: expected a .tar shard path, got {line[:80]!r}")
        file = Path(line).expanduser()
        files.append(file if file.is_absolute() else path.parent / file)
    if not files:
        raise ShardError(f"{path}: the shard list names no .tar files")
    return files


def _folder_shards(folder: Path, split: str) -> list[Path]:
    for name in _SPLIT_FOLDERS.get(split, (split,)):
        if _tars_in(folder / name):
            return _tars_in(folder / name)
    if split == "train" and _tars_in(folder):
        return _tars_in(folder)
    if split != "train" and (_tars_in(folder) or _tars_in(folder / "train")):
        raise FileNotFoundError(f"{folder} has shards but no val/ shards: fine-tuning from "
                                f"shards needs train/ and val/ shard folders (convnextv2 "
                                f"shards writes them from a tree with train/ and val/)")
    raise ShardError(f"--data {folder}: no .tar shards in the folder (nor in train/)")


# -- counting samples ----------------------------------------------------------------------------
def member_key(name: str) -> tuple[str | None, str]:
    """A tar member's (sample key, extension), as webdataset groups members."""
    from webdataset.tariterators import base_plus_ext
    key, ext = base_plus_ext(name)
    return key, (ext or "").lower()


def scan_shard(path: Path) -> tuple[int, dict[int, str], bool]:
    """(images, {class index: name}, every image labelled) of a shard, from its headers and
    its small ``.cls`` / ``.class.txt`` members; the images themselves are not read."""
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            end = 0
            for member in tar:
                end = member.offset_data + -(-member.size // 512) * 512
                key, ext = member_key(member.name) if member.isreg() else (None, "")
                if key is None:
                    continue
                entry = found.setdefault(key, {})
                if ext in IMAGE_KEYS:
                    entry["image"] = True
                elif ext == "cls":
                    entry["cls"] = int(tar.extractfile(member).read().decode().strip())
                elif ext == "class.txt":
                    entry["name"] = tar.extractfile(member).read().decode().strip()
            if path.stat().st_size < end + 1024:  # tarfile stops quietly at a cut header
                raise tarfile.ReadError("truncated: the end-of-archive blocks are missing")
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise ShardError(f"{path}: not a readable tar shard ({str(e) or type(e).__name__})") \
            from None
    images = [e for e in found.values() if e.get("image")]
    classes = {e["cls"]: e["name"] for e in images if "cls" in e and "name" in e}
    return len(images), classes, bool(images) and all("cls" in e for e in images)


def _indexed(file: Path, cache: dict) -> tuple[int, dict[int, str], bool] | None:
    """What ``shards.json`` beside ``file`` says of it (as ``scan_shard`` would), or None when
    it says nothing or its size no longer matches."""
    folder = file.parent
    if folder not in cache:
        try:
            index = json.loads((folder / SHARD_INDEX).read_text())
        except (OSError, ValueError):
            index = {}
        cache[folder] = (index, {e.get("name"): e for e in index.get("shards", [])})
    index, entries = cache[folder]
    entry = entries.get(file.name)
    if entry is None or entry.get("bytes") != file.stat().st_size:
        return None
    return int(entry["samples"]), dict(enumerate(index.get("classes", []))), \
        bool(index.get("labelled"))


def open_shard_set(source, split: str = "train") -> ShardSet:
    """The shards of ``source`` with their sample counts and classes (see the module doc).
    Shards ``shards.json`` does not vouch for are scanned, several at a time (on network
    storage each header read waits on a round trip)."""
    files = expand_shards(source, split)
    cache: dict = {}
    facts = [_indexed(file, cache) for file in files]
    unknown = [i for i, f in enumerate(facts) if f is None]
    if unknown:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(16, len(unknown))) as pool:
            for i, found in zip(unknown, pool.map(scan_shard, [files[i] for i in unknown])):
                facts[i] = found
    shards, class_names, labelled, offset = [], {}, True, 0
    for file, (count, names, is_labelled) in zip(files, facts):
        if count == 0:
            raise ShardError(f"{file}: the shard holds no images (members named KEY.jpg, "
                             f"KEY.png, ... with KEY.cls for the class)")
        shards.append(Shard(str(file), count, offset))
        offset += count
        class_names.update(names)
        labelled = labelled and is_labelled
    size = max(class_names, default=-1) + 1
    classes = [class_names.get(i, str(i)) for i in range(size)] if labelled else []
    return ShardSet(str(source), shards, classes, labelled)


# -- the stream ----------------------------------------------------------------------------------
def _key(seed: int, epoch: int, *what) -> int:
    """A seed for one of the stream's draws, from (seed, epoch, what it is for)."""
    from .keyed_random import sample_key
    return sample_key(seed, epoch, 0, salt="shards:" + ":".join(map(str, what)))


class ShardDataset(IterableDataset):
    """Samples of a ``ShardSet`` as ``(image, target[, index])``; ``index`` is the sample's
    global number (shard offset + position), what keys its augmentation and FCMAE mask.

    Fresh, it reads every shard once in order in one process (figures, evaluation);
    ``for_evaluation`` splits the shards between processes without repeats, and
    ``for_training`` makes it the shuffled, endless per-worker stream of the module doc.
    """

    def __init__(self, shard_set: ShardSet, transform: Callable | None = None,
                 strict: bool = False, with_index: bool = True):
        self.set, self.shards, self.classes = shard_set, shard_set.shards, shard_set.classes
        self.transform, self.strict, self.with_index = transform, strict, with_index
        self.rank, self.world_size, self.workers, self.batch_size = 0, 1, 0, 1
        self.seed, self.epoch, self.skip, self.training = 0, 0, 0, False
        self.buffer = SHUFFLE_BUFFER
        # 1 where a sample failed to decode; shared with the loader's worker processes
        self._decode_failed = torch.zeros(shard_set.samples, dtype=torch.uint8).share_memory_()

    # -- configuration ---------------------------------------------------------------------------
    def for_evaluation(self, rank: int = 0, world_size: int = 1) -> "ShardDataset":
        self.rank, self.world_size, self.training = rank, world_size, False
        return self

    def for_training(self, *, seed: int, rank: int, world_size: int, workers: int,
                     batch_size: int) -> "ShardDataset":
        """Split for ``world_size`` processes of ``workers`` loader workers each (fewer when a
        process has fewer shards: a worker reads whole shards); warns once when the split is
        uneven. Refuses fewer shards than processes."""
        n = len(self.shards)
        if n < world_size:
            raise ShardError(f"--data {self.set.source}: {n} shard(s) for {world_size} "
                             f"processes; each process needs at least one (write smaller "
                             f"shards: convnextv2 shards --shard-size)")
        per_rank = n // world_size
        used = min(workers, per_rank) if workers > 0 else 0
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.workers, self.batch_size, self.training = used, int(batch_size), True
        if rank == 0:
            if used < workers:
                _warn_once(f"warning: --workers {workers}: each process reads only {per_rank} "
                           f"shard(s) and a worker reads whole shards; using {used} worker(s)")
            slots = world_size * max(used, 1)
            sizes = {s.samples for s in self.shards}
            if n % slots or len(sizes) > 1:
                _warn_once(f"warning: --data {self.set.source}: {n} shard(s) of {min(sizes)}"
                           f"{'' if len(sizes) == 1 else f'..{max(sizes)}'} samples do not "
                           f"divide evenly over {world_size} process(es) x {max(used, 1)} "
                           f"reader(s): each epoch some samples repeat and some wait for a "
                           f"later epoch")
        return self

    @property
    def batches_per_epoch(self) -> int:
        """Batches every process takes per epoch: its share of the samples, whole batches."""
        return (self.set.samples // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, skip: int | None = None) -> None:
        """Start ``epoch``; ``skip``: samples of this process already trained in it (a
        resumed run). Without ``skip`` a new epoch starts at 0, the current one keeps its
        skip (the engine sets the position first, then the epoch)."""
        if skip is not None:
            self.skip = int(skip)
        elif int(epoch) != self.epoch:
            self.skip = 0
        self.epoch = int(epoch)

    # -- sizes and skips -------------------------------------------------------------------------
    def _rank_shards(self) -> list[Shard]:
        return self.shards[self.rank::self.world_size]

    def __len__(self) -> int:
        """Samples this process reads in an evaluation pass; all samples when training."""
        return self.set.samples if self.training else sum(s.samples for s in self._rank_shards())

    @property
    def num_skipped(self) -> int:
        return int(self._decode_failed.sum())

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if not self.training:
            for index, sample in self._read(self._rank_shards()[worker::workers]):
                item = self._item(index, sample, keyed=False)
                if item is not None:
                    yield item
            return
        done = self.skip // self.batch_size  # batches this process took of the epoch already
        logical = (worker + done) % workers  # a fresh loader starts at worker 0
        already = max(0, -(-(done - logical) // workers)) * self.batch_size
        stream = itertools.islice(self._worker_stream(logical, workers), already, None)
        for index, sample in stream:
            item = self._item(index, sample, keyed=True)
            if item is not None:
                yield item

    def epoch_shards(self, logical_worker: int, workers: int) -> list[Shard]:
        """The shards one worker of this process reads first in the current epoch."""
        order = list(self.shards)
        random.Random(_key(self.seed, self.epoch, "order")).shuffle(order)
        return order[self.rank::self.world_size][logical_worker::workers]

    def _worker_stream(self, logical: int, workers: int):
        """One worker's endless stream: its shards through a shuffle buffer, then again
        (reshuffled) each time they run out. Each pass is shuffled on its own, so the first
        pass yields every sample of the worker's shards exactly once."""
        from webdataset import shuffle
        mine = self.epoch_shards(logical, workers)
        for cycle in itertools.count():
            shards = list(mine)
            if cycle:
                random.Random(_key(self.seed, self.epoch, "cycle", cycle, self.rank,
                                   logical)).shuffle(shards)
            seed = _key(self.seed, self.epoch, "buffer", cycle, self.rank, logical)
            yield from shuffle(self.buffer, self.buffer, seed=seed)(self._read(shards))

    def _read(self, shards: list[Shard]):
        """``(global index, raw sample)`` of ``shards`` in order, via webdataset."""
        from webdataset import tarfile_samples
        for shard in shards:
            samples = tarfile_samples([{"url": shard.path}], handler=self._tar_problem)
            for position, sample in enumerate(s for s in samples if _image_key(s)):
                if position >= shard.samples:
                    break
                yield shard.offset + position, sample

    def _tar_problem(self, exn: Exception) -> bool:
        """webdataset's handler: a damaged shard is fatal with ``strict``, else the rest of
        it is skipped with one warning."""
        if self.strict:
            raise ShardError(f"unreadable tar shard: {exn}") from None
        _warn_once(f"warning: skipping the rest of a damaged shard: {str(exn)[:200]}")
        return True

    def _item(self, index: int, sample: dict, keyed: bool):
        where = f"{sample.get('__url__')} sample {sample.get('__key__')}"
        try:
            image = _decode(sample[_image_key(sample)], where)
        except (*READ_ERRORS, ImageTooLargeError) as e:
            if self.strict:
                raise CorruptImageError(f"unreadable image {where}: {e}") from None
            if not self._decode_failed[index]:
                self._decode_failed[index] = 1
                log.warning("warning: skipping unreadable image %s: %s", where, e)
            return None
        target = int(sample["cls"]) if "cls" in sample else 0
        if self.transform is not None:
            if keyed:
                from .keyed_random import keyed_rngs, sample_key as keyed_seed
                with keyed_rngs(keyed_seed(self.seed, self.epoch, index)):
                    image = self.transform(image)
            else:
                image = self.transform(image)
        return (image, target, index) if self.with_index else (image, target)


def _decode(data: bytes, where: str) -> Image.Image:
    """A shard member's image, decoded, under the readers' pixel limit (checked from the
    header first), 16-bit data scaled to 8 bits."""
    with Image.open(io.BytesIO(data)) as img:
        check_size(img, where)
        img.load()
        out = to_8bit(img)
        return out.copy() if out is img else out


def _image_key(sample: dict) -> str | None:
    return next((k for k in IMAGE_KEYS if k in sample), None)


def open_shards(source, split: str = "train", transform: Callable | None = None,
                strict: bool = False, labelled: bool | None = None,
                with_index: bool = True) -> ShardDataset:
    """A ``ShardDataset`` over the shards of ``source`` (read once, in order, until
    ``for_training`` / ``for_evaluation``). ``labelled=True`` refuses shards without ``.cls``."""
    shard_set = open_shard_set(source, split)
    if labelled and not shard_set.labelled:
        raise ShardError(f"--data {source}: the shards have no class labels (KEY.cls members); "
                         f"fine-tuning needs them (convnextv2 shards writes them from an "
                         f"ImageFolder)")
    return ShardDataset(shard_set, transform, strict, with_index)


class _ShardPosition:
    """What the training engine calls the sampler: ``set_epoch(epoch, skip)``."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.dataset.set_epoch(epoch, skip)


class ShardLoader:
    """Batches of a training ``ShardDataset`` with the loader interface the engine drives
    (``.sampler.set_epoch(epoch, skip)``, ``.dataset``, ``.batch_size``, ``len``): a fresh
    ``DataLoader`` per epoch, so workers see the epoch and the skip."""

    def __init__(self, dataset: ShardDataset, collate_fn=None, pin_memory: bool = False):
        self.dataset, self.batch_size = dataset, dataset.batch_size
        self.sampler = _ShardPosition(dataset)
        self.collate_fn, self.pin_memory = collate_fn, pin_memory

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch

    def __iter__(self):
        return iter(DataLoader(self.dataset, batch_size=self.batch_size,
                               num_workers=self.dataset.workers, collate_fn=self.collate_fn,
                               pin_memory=self.pin_memory, persistent_workers=False))
