"""CSV/TSV file lists as datasets: one ``path,label`` row per image.

A list names images anywhere on disk without moving them into class folders. Rules:

- ``.csv`` rows are comma separated, ``.tsv`` rows tab separated;
- a header row is optional: a first row whose label is not an integer and whose path is not
  an existing file is taken as a header;
- relative paths are relative to the folder of the list file, not to the working directory
  (the list then works wherever the command is run from);
- labels are integers (class ``i`` is named ``"i"``) or class names (sorted, numbered from 0);
- for pretraining (``labelled=False``) labels are ignored and may be left out.

A bad row (wrong number of fields, missing file, empty label) stops with one line naming
``file:line``: a list is written by a script, and a silently skipped row is a lost image.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from .datasets import _FileDataset

LIST_SUFFIXES = {".csv": ",", ".tsv": "\t"}


class FileListError(ValueError):
    """A row of a file list that cannot be used, named as ``file:line``."""


def is_file_list(source) -> bool:
    """True for a ``.csv`` / ``.tsv`` path (whether or not it exists: a missing list is then
    reported as such, not as a missing folder)."""
    return Path(str(source)).suffix.lower() in LIST_SUFFIXES


def val_list_for(train_list: Path) -> Path:
    """The validation list that goes with ``train_list``: ``train.csv`` -> ``val.csv``,
    ``imagenet_train.tsv`` -> ``imagenet_val.tsv`` (the last ``train`` in the name)."""
    name = train_list.name
    if "train" not in name:
        raise FileNotFoundError(f"{train_list}: the val split of a file list is the list named "
                                f"like it with 'train' replaced by 'val' (train.csv -> val.csv); "
                                f"'{name}' has no 'train' in its name")
    i = name.rindex("train")
    val = train_list.with_name(name[:i] + "val" + name[i + len("train"):])
    if not val.is_file():
        raise FileNotFoundError(f"{train_list}: the val split is read from {val.name} beside "
                                f"it ('train' replaced by 'val'), which does not exist")
    return val


def read_file_list(path: str | Path, labelled: bool = True) -> tuple[list[tuple[Path, str]], Path]:
    """The ``(image path, label text)`` rows of the list at ``path`` (label "" when
    ``labelled`` is False and the row has none), paths resolved against the list's folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"file list {path} does not exist (give a .csv or .tsv with "
                                f"one 'path,label' row per image)")
    delimiter = LIST_SUFFIXES.get(path.suffix.lower(), "\t")
    base = path.parent
    rows, first = [], True
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, fields in enumerate(csv.reader(f, delimiter=delimiter), start=1):
            where = f"{path}:{line_no}"
            fields = [x.strip() for x in fields]
            if not fields or fields == [""]:
                continue  # blank line
            want = "'path,label'" if delimiter == "," else "'path<TAB>label'"
            if len(fields) > 2 or (labelled and len(fields) != 2):
                raise FileListError(f"{where}: expected {want}, got {len(fields)} field(s): "
                                    f"{delimiter.join(fields)[:80]!r}")
            image, label = fields[0], (fields[1] if len(fields) == 2 else "")
            if not image:
                raise FileListError(f"{where}: empty path")
            file = Path(image).expanduser()
            file = file if file.is_absolute() else base / file
            if first and _is_header(file, label):
                first = False
                continue
            first = False
            if labelled and not label:
                raise FileListError(f"{where}: empty label for {image}")
            if not file.is_file():
                raise FileListError(f"{where}: no file {file}")
            rows.append((file, label))
    if not rows:
        raise FileListError(f"{path}: the list has no image rows")
    return rows, path


def _is_header(file: Path, label: str) -> bool:
    return not file.is_file() and not _is_int(label)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def label_classes(labels: list[str]) -> tuple[list[int], list[str]]:
    """Integer targets and class names: integer labels keep their numbers (classes
    ``"0".."max"``), names are numbered in sorted order."""
    if all(_is_int(x) for x in labels):
        targets = [int(x) for x in labels]
        if min(targets) < 0:
            raise FileListError(f"labels must be >= 0, got {min(targets)}")
        return targets, [str(i) for i in range(max(targets) + 1)]
    classes = sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    return [index[x] for x in labels], classes


class FileListDataset(_FileDataset):
    """The images of a CSV/TSV list with their labels (``labelled=False``: targets 0 and no
    classes, for pretraining). Unreadable images follow the folder datasets' policy: skipped
    and counted, or fatal with ``strict``."""

    def __init__(self, list_path: str | Path, transform: Callable | None = None,
                 strict: bool = False, labelled: bool = True):
        rows, path = read_file_list(list_path, labelled)
        if labelled:
            targets, classes = label_classes([label for _, label in rows])
        else:
            targets, classes = [0] * len(rows), []
        samples = [(file, t) for (file, _), t in zip(rows, targets)]
        super().__init__(samples, classes, transform, strict, path)
