"""Crash-safe training checkpoints ("run state") and exact resume.

A run state is a plain dict saved with ``torch.save`` and loadable with ``weights_only=True``:
tensors, numbers, strings, lists and dicts only. It holds everything a loop needs to continue
as if it had never stopped: model and optimizer (and grad-scaler) state, the position
(``epoch``, ``batches_done`` micro-batches into that epoch, ``global_step`` optimizer steps),
the RNG states of torch (CPU and CUDA), numpy and python, the data-order key, and the run's
arguments.

Files are ``checkpoint-<global_step>.pt``. Writes go to a hidden temp file in the same folder,
are flushed and fsynced, then ``os.replace``-d into place, so a crash leaves either the old set
of checkpoints or the new one, never a truncated file under a real name; ``latest_checkpoint``
only ever looks at real names.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.atomic import atomic_write

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
FORMAT = "convnextv2-runstate-1"


def checkpoint_path(folder: str | Path, global_step: int) -> Path:
    return Path(folder) / f"checkpoint-{int(global_step):08d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (by global step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint, or None (temp files of interrupted writes are ignored)."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file next to ``path``, fsync, then rename over ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_run_state(folder: str | Path, state: dict, keep_last: int = 3) -> Path:
    """Write ``state`` as ``checkpoint-<state['global_step']>.pt`` atomically, then delete all
    but the newest ``keep_last`` checkpoints (0 or less keeps every one)."""
    path = atomic_torch_save(state, checkpoint_path(folder, state["global_step"]))
    if keep_last and keep_last > 0:
        for old in list_checkpoints(folder)[:-keep_last]:
            if old != path:  # never the file just written, whatever else the folder holds
                old.unlink(missing_ok=True)
    return path


TEMP_RE = re.compile(r"^\.checkpoint-\d+\.pt\..+\.tmp$")


def remove_orphaned_temps(folder: str | Path) -> list[Path]:
    """Delete the hidden temp files (``.checkpoint-*.pt.*.tmp``) that a kill in the middle of a
    checkpoint write leaves; call it before a run starts writing to ``folder``."""
    folder = Path(folder)
    removed = [p for p in folder.iterdir() if TEMP_RE.match(p.name) and p.is_file()] \
        if folder.is_dir() else []
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def resolve_resume(resume: str | None, folder: str | Path) -> Path | None:
    """``None``/``""`` -> None; ``"auto"`` -> newest checkpoint in ``folder`` or None;
    anything else is a path that must exist."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(folder)
    path = Path(resume).expanduser()
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--resume {resume}: the folder holds no checkpoint-*.pt file")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint (give a checkpoint-*.pt "
                                f"file, a run folder, or 'auto')")
    return path


def load_resume_state(resume: str | None, folder: str | Path,
                      warn=print) -> tuple[Path | None, dict | None]:
    """The run state to continue from: ``(path, state)``, or ``(None, None)`` for a fresh start.

    With ``"auto"`` or a run folder, a newest checkpoint that cannot be read (truncated by a
    full disk, corrupted) is reported through ``warn`` and the next older one is tried; nothing
    is deleted, so the damaged file stays for inspection. A checkpoint named explicitly must
    itself be readable."""
    if not resume:
        return None, None
    path = Path(resume).expanduser()
    if resume != "auto" and not path.is_dir():
        path = resolve_resume(resume, folder)  # a file: checked, no fallback
        return path, load_run_state(path)
    where = Path(folder) if resume == "auto" else path
    candidates = list_checkpoints(where)[::-1]
    if not candidates:
        if resume != "auto":
            raise FileNotFoundError(f"--resume {resume}: the folder holds no checkpoint-*.pt file")
        return None, None
    for i, candidate in enumerate(candidates):
        try:
            state = load_run_state(candidate)
        except ValueError as e:
            later = candidates[i + 1].name if i + 1 < len(candidates) else None
            warn(f"warning: {e}; " + (f"trying the older {later} (nothing is deleted)" if later
                                      else "no older checkpoint is left"))
            continue
        return candidate, state
    raise ValueError(f"--resume {resume}: none of the {len(candidates)} checkpoint(s) in {where} "
                     f"can be read; start a new --output (the damaged files were kept)")


def load_run_state(path: str | Path) -> dict:
    """Load a run state safely (``weights_only=True``: no arbitrary pickles)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / foreign file
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot read run state {path} (truncated or damaged? {cause})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of this package "
                         f"(expected format {FORMAT!r})")
    return state


# -- RNG state -------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """torch (CPU + every CUDA device), numpy and python RNG states as tensors / lists."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=dict(kind=np_state[0], key=torch.from_numpy(np_state[1].astype(np.int64)),
                   pos=int(np_state[2]), has_gauss=int(np_state[3]),
                   cached_gaussian=float(np_state[4])),
        python=dict(version=py_version, internal=list(py_internal), gauss=py_gauss),
    )


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# -- plain-dict arguments --------------------------------------------------------------------
def plain(obj):
    """Arguments as JSON-like builtins (paths -> str, tuples -> lists), safe for weights_only."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return None
    return str(obj)


def build_run_state(*, model: torch.nn.Module, optimizer, epoch: int, batches_done: int,
                    global_step: int, args: dict, scaler=None, data_order: dict | None = None,
                    extra: dict | None = None) -> dict:
    """The dict ``save_run_state`` writes. ``model`` may be DDP-wrapped (unwrapped here).

    ``batches_done``: micro-batches of ``epoch`` already consumed (0 at an epoch start);
    ``data_order``: what regenerates the sample order (e.g. ``{"seed": s}`` when the order is
    a function of seed and epoch), ``extra``: anything else the loop wants back (plain types).
    """
    model = getattr(model, "module", model)
    return dict(
        format=FORMAT,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        epoch=int(epoch), batches_done=int(batches_done), global_step=int(global_step),
        rng=capture_rng_state(),
        data_order=plain(data_order or {}),
        args=plain(args),
        extra=plain(extra or {}),
    )


def apply_run_state(state: dict, *, model: torch.nn.Module, optimizer=None, scaler=None,
                    restore_rng: bool = True) -> dict:
    """Load model / optimizer / scaler / RNG from ``state``; returns the position dict
    ``{"epoch", "batches_done", "global_step"}``."""
    getattr(model, "module", model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return restore_position(state, scaler=scaler, restore_rng=restore_rng)


def restore_position(state: dict, *, scaler=None, restore_rng: bool = True) -> dict:
    """The part of a resume shared by every way of loading weights: grad scaler, RNG states,
    and the position ``{"epoch", "batches_done", "global_step"}`` that is returned."""
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        restore_rng_state(state["rng"])
    return dict(epoch=state["epoch"], batches_done=state["batches_done"],
                global_step=state["global_step"])
