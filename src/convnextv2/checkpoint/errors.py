"""The one exception every checkpoint failure raises."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or loaded.

    ``missing``, ``unexpected`` and ``mismatched`` (key -> (checkpoint shape, model shape)) are
    filled when the failure is about keys, so callers can inspect them as well as read them.
    """

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=None):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = dict(mismatched or {})


def preview(names, limit: int = 8) -> str:
    """``a, b, c ... and 12 more``: long key lists stay readable in one error message."""
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the given path (and no hub id): both a CheckpointError and a
    FileNotFoundError, so either ``except`` clause catches it."""

    def __init__(self, message: str):
        CheckpointError.__init__(self, message)
