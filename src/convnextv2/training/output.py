"""The one policy for output folders: what a run may write into, and what it leaves alone.

Two kinds of callers, two rules, both here so that every command follows the same ones:

- a training run (``pretrain``, ``finetune``, ``detect|segment train``) gets the folder it was
  given: a run already there is only continued (``--resume``) or moved aside
  (``--overwrite``), never silently replaced (``check_output``, then ``prepare_output``);
- a demo or a study never touches an earlier one: a folder that already holds anything is left
  alone and the next free ``OUTPUT-2``, ``OUTPUT-3``, ... is used (``fresh_output``).

The checks only read; only ``prepare_output`` and ``fresh_output`` create anything.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .runstate import remove_orphaned_temps

if TYPE_CHECKING:
    from .config import RunConfig

# the files a training run leaves in its output folder; one of them means "a run lives here"
RUN_FILES = ("metrics.jsonl", "steps.jsonl", "summary.json", "config.json", "config.yaml",
             "encoder.safetensors", "fcmae.safetensors", "best.safetensors",
             "best_ema.safetensors", "last.safetensors", "last_ema.safetensors", "model.pt")


# written at start-up: alone (with empty logs) they are a run that failed before its first
# step, which holds nothing to lose and must not block a plain re-run
START_UP_FILES = ("config.json", "config.yaml")


def existing_run(out: Path) -> list[str]:
    """Names of run files in ``out`` (empty when it holds no run). Empty files (the logs of a
    run that stopped during start-up) do not count, nor do the start-up configs alone."""
    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir()
                   if (p.name in RUN_FILES or (p.name.startswith("checkpoint-")
                                               and p.name.endswith(".pt")))
                   and p.is_file() and p.stat().st_size > 0)
    if all(n in START_UP_FILES for n in names):
        return []
    return names


def check_output(cfg: RunConfig) -> Path:
    """Read-only checks of ``cfg.output`` before any work: it can be created and written, and
    a run already there is only continued (``resume``) or moved aside (``overwrite``), never
    silently replaced. Safe to call on every process of a distributed run."""
    out = Path(cfg.output).expanduser()
    check_writable(out, create=False)
    found = existing_run(out)
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    if found and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"--output {cfg.output} already holds a run ({shown}); continue it with "
                         f"--resume auto, choose a new --output, or add --overwrite to move "
                         f"the old run aside to {aside_name(out).name}")
    weights = [n for n in found if n.endswith(".safetensors")]
    if cfg.resume == "auto" and weights and not any(n.startswith("checkpoint-") for n in found):
        raise ValueError(f"--resume auto: {cfg.output} holds weights ({', '.join(weights)}) but no "
                         f"checkpoint to continue from, and starting over would replace them; "
                         f"choose a new --output, or add --overwrite instead of --resume to move "
                         f"the old run aside")
    return out


def prepare_output(cfg: RunConfig, out: Path) -> Path | None:
    """Create ``out`` (main process only), move an old run aside under ``overwrite``, and
    remove temp files of checkpoint writes a kill interrupted. Returns where the old run went."""
    moved = None
    if cfg.overwrite and existing_run(out):
        moved = aside_name(out)
        shutil.move(str(out), str(moved))
        print(f"--overwrite: moved the old run in {out} to {moved}", flush=True)
    check_writable(out, create=True)
    removed = remove_orphaned_temps(out)
    if removed:
        print(f"removed {len(removed)} unfinished checkpoint write(s) left by an interrupted "
              f"run: {', '.join(p.name for p in removed)}", flush=True)
    return moved


def aside_name(out: Path) -> Path:
    """A sibling ``<name>.old-<UTC time>`` that does not exist yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = out.with_name(f"{out.name}.old-{stamp}-{n}")
    return candidate


def check_writable(output: str | os.PathLike, create: bool = True) -> Path:
    """Prove files can be written to ``output``. ``create`` makes the folder and writes a
    throw-away file there; otherwise nothing is written: an existing folder must be writable,
    a missing one must have a writable nearest existing parent."""
    import tempfile
    out = Path(output).expanduser()
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
                pass
            return out
        probe = out
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is a file")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as e:
        raise PermissionError(f"--output {output}: cannot write there ({e.strerror or e}); "
                              f"pick a folder you can write to") from None
    return out


def fresh_output(output: str | os.PathLike) -> Path:
    """The folder a demo or study writes to, created: ``output`` when it is absent or empty,
    else the first free ``output-2``, ``output-3``, ... (with a line saying so), so that a new
    run never overwrites, or trips over, an earlier one."""
    base = Path(output).expanduser()
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    check_writable(candidate, create=True)
    if candidate != base:
        print(f"{output} holds an earlier run; writing this one to {candidate}", flush=True)
    return candidate
