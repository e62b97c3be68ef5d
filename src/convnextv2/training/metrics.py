"""``metrics.jsonl`` logging (one JSON object per line, flushed as written) and curve PNGs.

On resume the file is first cut back to the resumed step, so lines written after the
checkpoint by the interrupted run do not appear twice: the file always reads as one run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence


class MetricsLog:
    """Append-only JSON-lines log.

    Args:
        path: the ``.jsonl`` file.
        resume_step: None starts a fresh file (an old one is replaced); a number keeps the
            existing lines whose ``step_key`` is <= it and drops the rest.
        enabled: False makes every call a no-op (non-zero ranks of a distributed run).
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True,
                 step_key: str = "step"):
        self.path, self.enabled, self.step_key = Path(path), enabled, step_key
        self._file = None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_after(self.path, resume_step, step_key)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _jsonable(v):
    if hasattr(v, "item"):  # 0-d tensors / numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """Every complete line of a metrics file (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: str | Path, step: int, step_key: str = "step") -> int:
    """Rewrite ``path`` keeping only records with ``step_key <= step``; returns how many were
    dropped. Written atomically so a crash here cannot lose the kept lines."""
    path = Path(path)
    if not path.is_file():
        path.write_text("")
        return 0
    records = read_metrics(path)
    kept = [r for r in records if r.get(step_key, -1) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(records) - len(kept)


def plot_curves(records: Sequence[dict], path: str | Path, keys: Iterable[str] = ("loss",),
                x: str = "step", title: str | None = None, log_y: bool = False,
                smooth: int = 0) -> Path | None:
    """Line plot of ``keys`` against ``x`` (matplotlib, Agg: no display needed).

    ``smooth`` > 1 overlays a running mean over that many points. Returns None when no record
    has any of the keys.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(keys)
    series = {k: [(r[x], r[k]) for r in records
                  if x in r and isinstance(r.get(k), (int, float))] for k in keys}
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, points in series.items():
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, lw=1.0, alpha=0.45 if smooth > 1 else 1.0, label=key)
        if smooth > 1 and len(ys) >= smooth:
            run = [sum(ys[max(0, i - smooth + 1):i + 1]) / (i + 1 - max(0, i - smooth + 1))
                   for i in range(len(ys))]
            ax.plot(xs, run, lw=1.8, label=f"{key} (mean of {smooth})")
    ax.set_xlabel(x)
    ax.set_ylabel(keys[0] if len(keys) == 1 else "value")
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Throughput:
    """Images per second over the last optimizer step (wall clock between calls)."""

    def __init__(self):
        import time
        self._time = time.perf_counter
        self._last = self._time()

    def reset(self) -> None:
        self._last = self._time()

    def rate(self, images: int) -> float:
        now = self._time()
        dt, self._last = now - self._last, now
        return images / dt if dt > 0 else float("nan")
