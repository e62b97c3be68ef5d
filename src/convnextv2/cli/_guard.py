"""What every subcommand shares on the way in and out: one-line usage errors and a checked
``--device``.

A user's mistake must end in exit status 2 and a single line naming the bad input and what is
accepted. argparse's own errors print the whole usage block first (a dozen lines for
``finetune``), which buries the one line that matters, so the parser here prints that line
alone and points to ``--help``. ``--device`` is checked before any work starts: ``torch.device``
raises a ``RuntimeError`` listing every backend torch was ever built for (``tpu`` is not one;
``xla`` would be accepted and then fail deep inside the model), and a CUDA request on a machine
without CUDA would otherwise fail only after the data has been read.
"""
from __future__ import annotations

import argparse
import re
import sys


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


def one_line(text: object) -> str:
    """``text`` on a single line, without terminal colour codes: exception messages from
    libraries may span several lines, and torch's carry ANSI bold markers."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` value this machine cannot run on, naming what it accepts.

    Accepted: ``auto`` (or unset), ``cpu``, ``cuda`` and ``cuda:N`` where CUDA is present,
    ``mps`` where Apple's Metal backend is present.
    """
    if device in (None, "", "auto", "cpu"):
        return
    import torch

    accepted = "auto, cpu, cuda, cuda:N"
    kind, _, index = str(device).partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; "
                             f"use --device cpu (or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
        return
    if kind == "mps" and not index:
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return
        raise ValueError(f"--device mps: Apple's Metal backend is not available here; "
                         f"use one of {accepted}")
    raise ValueError(f"--device {device!r} is not a device this program runs on; "
                     f"use one of {accepted}")


def report_error(command: str | None, error: BaseException) -> int:
    """Print ``error`` as the command's one-line error message; returns exit status 2."""
    prefix = f"convnextv2 {command}" if command else "convnextv2"
    print(f"{prefix}: error: {one_line(_cause(error))}", file=sys.stderr)
    return 2


def _cause(error: BaseException) -> str:
    """The message itself. An error raised in a DataLoader worker comes back re-raised with the
    worker's whole traceback in its text; the user's line is the last one of it, less the
    exception's qualified class name."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "." in head and " " not in head else last


def require_classifier(model, checkpoint) -> None:
    """Refuse a checkpoint without a classifier head (an FCMAE encoder, or a file whose head
    was dropped): its outputs would be features or a random head's guesses, not classes."""
    head = getattr(model, "load_report", {}).get("head", "loaded")
    if model.config.get("num_classes", 0) == 0 or head != "loaded":
        raise ValueError(f"{checkpoint} has no classifier head (an encoder only, e.g. pretrain's "
                         f"encoder.safetensors); fine-tune it first: convnextv2 finetune "
                         f"--finetune {checkpoint} --data DATA --output RUN")


MAX_IMG_SIZE = 4096  # 4096 px is already ~8 GB of activations for the smallest variant


def check_img_size(img_size, config: dict, flag: str = "--img-size") -> None:
    """Refuse an input size the network cannot take: below its total stride the last
    downsampling has no pixel left (a deep RuntimeError otherwise), and sizes beyond
    ``MAX_IMG_SIZE`` exhaust memory before any message could be printed."""
    if img_size is None:
        return
    stride = int(config.get("stem_stride", 4)) * 8
    if img_size < stride:
        raise ValueError(f"{flag} {img_size} is smaller than the network's total stride {stride} "
                         f"px; use at least {stride} (a multiple of {stride} fits best)")
    if img_size > MAX_IMG_SIZE:
        raise ValueError(f"{flag} {img_size} is larger than {MAX_IMG_SIZE} px, far beyond what "
                         f"these models are made for; use e.g. 224 or 384")


def writable_folder(folder, flag: str = "--output"):
    """``folder`` created if needed and proven writable, or a one-line PermissionError: the
    bare OSError ("[Errno 17] File exists") does not say which option is wrong or why."""
    import tempfile
    from pathlib import Path

    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"{flag} {folder}: cannot write there ({e.strerror or e}); pick a "
                              f"folder you can write to") from None
    return folder


def writable_file(path, flag: str = "--output", example: str = "out.png"):
    """A file path whose folder can be written and which is not itself a folder."""
    from pathlib import Path

    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name (e.g. {path / example})")
    writable_folder(path.parent, flag)
    return path


def expand_images(items) -> list:
    """Image paths from the command line: files as given, folders as the image files directly
    inside them (name order). A missing path or an image-less folder is a one-line error."""
    from pathlib import Path

    from ..data import IMAGE_EXTENSIONS, image_files

    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise FileNotFoundError(f"folder {path} holds no image files (expected "
                                        f"{', '.join(IMAGE_EXTENSIONS)} directly inside)")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    return paths


def at_least(flag: str, value, low) -> None:
    """A numeric option below its minimum is a one-line error naming both."""
    if value is not None and value < low:
        raise ValueError(f"{flag} must be >= {low}, got {value}")
