"""Running the many training jobs of a demo or a study: one after another in this process, or
several side by side in child processes, with dependencies and an optional deadline.

Why child processes and not threads: each job is a whole training run holding the GIL and its
own torch thread pool. On a small CPU machine two single-threaded runs side by side finish
sooner than one after the other with two threads each (OpenMP threads spin against the other
processes); on a GPU, tiny models are launch-bound and several processes keep it busy.

A job names its function as ``"package.module:function"`` or ``"path/to/file.py:function"``
(a study script), with keyword arguments that JSON can carry: the children are workers
(``python -m convnextv2.demos.runner``) that read the path of a job file from stdin,
run it and write the function's result (a dict) or its error next to the job file, then take the
next job. The parent never unpickles anything from a child.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

GRACE_S = 25.0   # after the deadline, how long running jobs may still finish before the kill


class JobFailed(RuntimeError):
    """A job of a batch that stops at the first failure ended in an error."""


@dataclass
class Job:
    """One unit of work: ``target(**kwargs)`` returning a dict (its record)."""
    name: str
    target: str                          # "package.module:function" or "file.py:function"
    kwargs: dict = field(default_factory=dict)
    deps: tuple = ()                     # names of jobs that must succeed first
    threads: int | None = None           # torch threads; None: the process's (1 in a worker)


# -- the machine ---------------------------------------------------------------------------------
def say(text: str) -> None:
    """A progress line, flushed at once: demos run for minutes, often piped into a log."""
    print(text, flush=True)


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def pick_threads(requested: int | None = None) -> int:
    """``requested``, else torch's default (one thread per core) unless the machine is already
    busy: then two OpenMP threads per process spin against the other processes and small
    models run several times slower than with one thread (measured on a shared 2-core
    machine)."""
    import torch

    if requested:
        return requested
    load = load_average()
    busy = load is not None and load >= (os.cpu_count() or 1)
    return 1 if busy else torch.get_num_threads()


def pick_jobs(requested: int | None = None) -> int:
    """``requested``, else 2 side by side where there are 2 cores or more, else 1."""
    if requested:
        return requested
    return 2 if (os.cpu_count() or 1) >= 2 else 1


# -- running -------------------------------------------------------------------------------------
def run_jobs(jobs: list[Job], parallel: int = 1, deadline_s: float | None = None,
             log_dir: str | os.PathLike | None = None,
             on_done: Callable[[Job, dict, dict], None] | None = None,
             keep_going: bool = False) -> dict[str, dict]:
    """Run ``jobs`` in list order as their dependencies allow, ``parallel`` at a time
    (1: in this process, else child processes). Returns ``{name: record}``: the function's
    dict plus ``seconds``. ``on_done(job, record, records)`` is called as each job ends.

    A failure stops the batch: in this process the job's exception propagates as it is (a
    user's mistake stays a one-line error), from a child ``JobFailed`` is raised and the other
    children are killed. With ``keep_going`` (a study that reports what finished) a failed job
    gets an ``error`` record instead, and so do the jobs it blocks; after ``deadline_s``
    nothing new starts, and ``GRACE_S`` later running children are killed. Children write
    their output to ``log_dir/NAME.log`` when it is given (with their job and result files),
    else to this process's terminal."""
    batch = _Batch(jobs, deadline_s, on_done, keep_going)
    if parallel <= 1:
        return batch.run_here()
    if log_dir is not None:
        return batch.run_children(parallel, Path(log_dir), True)
    with tempfile.TemporaryDirectory(prefix="convnextv2-jobs.") as folder:
        return batch.run_children(parallel, Path(folder), False)


class _Batch:
    """The bookkeeping shared by both ways of running: what is done, ready, blocked, late."""

    def __init__(self, jobs: list[Job], deadline_s: float | None, on_done, keep_going: bool):
        self.pending, self.deadline_s, self.on_done = list(jobs), deadline_s, on_done
        self.keep_going = keep_going
        self.records: dict[str, dict] = {}
        self.t0 = time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0

    def finish(self, job: Job, record: dict) -> None:
        self.records[job.name] = record
        if self.on_done:
            self.on_done(job, record, self.records)
        if "error" in record and not self.keep_going:
            raise JobFailed(f"{job.name}: {record['error']}")

    def skip_the_doomed(self) -> None:
        """Record as skipped the pending jobs that cannot run: a dependency failed, or the
        deadline has passed."""
        late = self.deadline_s is not None and self.elapsed() > self.deadline_s
        for job in list(self.pending):
            failed = any("error" in self.records.get(d, {}) for d in job.deps)
            if failed or late:
                self.pending.remove(job)
                self.finish(job, dict(error="skipped: " + ("a run it needs failed" if failed
                                                           else "past the deadline")))

    def next_ready(self) -> Job | None:
        job = next((j for j in self.pending if all(d in self.records for d in j.deps)), None)
        if job is not None:
            self.pending.remove(job)
        return job

    def run_here(self) -> dict[str, dict]:
        while self.pending:
            self.skip_the_doomed()
            job = self.next_ready()
            if job is None:
                break  # only possible with a dependency that is not in the batch
            self.finish(job, call(job, catch=self.keep_going))
        return self.records

    def run_children(self, parallel: int, folder: Path, keep_logs: bool) -> dict[str, dict]:
        folder.mkdir(parents=True, exist_ok=True)
        workers: list[_Worker] = []
        try:
            return self._schedule(parallel, folder, keep_logs, workers)
        finally:  # a failure, or Ctrl-C, leaves no child behind
            for worker in workers:
                worker.stop()

    def _schedule(self, parallel: int, folder: Path, keep_logs: bool,
                  workers: list[_Worker]) -> dict[str, dict]:
        while self.pending or any(w.job for w in workers):
            self.skip_the_doomed()
            workers[:] = [w for w in workers if w.job or w.alive()]  # replace dead idle ones
            idle = [w for w in workers if w.job is None]
            while self.pending and (idle or len(workers) < parallel):
                job = self.next_ready()
                if job is None:
                    break
                if not idle:
                    workers.append(_Worker(folder, keep_logs))
                    idle.append(workers[-1])
                idle.pop().start(job)
                say(f"[{self.elapsed():5.0f} s] started {job.name}")
            time.sleep(0.2)
            kill = self.deadline_s is not None and self.elapsed() > self.deadline_s + GRACE_S
            for worker in workers:
                job = worker.job
                record = worker.poll(kill) if job else None
                if record is not None:
                    self.finish(job, record)
            if not any(w.job for w in workers) and self.pending and not any(
                    all(d in self.records for d in j.deps) for j in self.pending):
                break  # what is left waits on a job that is not in the batch
        return self.records


class _Worker:
    """A child process that runs jobs one after another, each given as the path of a job file
    on its stdin. Importing torch and the package takes seconds, so a worker pays it once for
    all the jobs it runs."""

    def __init__(self, folder: Path, keep_logs: bool):
        self.folder, self.keep_logs = folder, keep_logs
        self.job: Job | None = None
        self.proc = subprocess.Popen([sys.executable, "-m", "convnextv2.demos.runner"],
                                     stdin=subprocess.PIPE, text=True, env=_child_env())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, job: Job) -> None:
        tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in job.name)
        self.result = self.folder / f"{tag}.result.json"
        self.log = self.folder / f"{tag}.log" if self.keep_logs else None
        self.result.unlink(missing_ok=True)  # only this run's record may count
        job_file = self.folder / f"{tag}.json"
        job_file.write_text(json.dumps(dict(target=job.target, kwargs=job.kwargs,
                                            threads=job.threads, result=str(self.result),
                                            log=str(self.log) if self.log else None)))
        self.proc.stdin.write(f"{job_file}\n")
        self.proc.stdin.flush()
        self.job = job

    def poll(self, kill: bool) -> dict | None:
        """The running job's record once it has ended, else None; ``kill`` ends it now."""
        if self.result.is_file():
            self.job = None
            return json.loads(self.result.read_text())
        if self.alive() and not kill:
            return None
        if self.alive():
            self.stop()
            return dict(error="killed at the deadline")
        self.job = None
        where = f"; log: {self.log}: {_last_line(self.log)}" if self.log else ""
        return dict(error=f"exit status {self.proc.returncode}{where}")

    def stop(self) -> None:
        """End the process: killed when it is still running a job, else told to exit."""
        if self.job is not None and self.alive():
            self.proc.kill()
        else:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # an idle worker that will not exit is killed
            self.proc.kill()
            self.proc.wait()
        self.job = None


def call(job: Job, catch: bool = True) -> dict:
    """Run ``job`` in this process: its record, with ``seconds``. With ``catch`` an exception
    is recorded as ``error`` (its traceback printed), so one broken run does not lose the
    others; without, it propagates."""
    t0 = time.time()
    try:
        if job.threads:
            import torch
            torch.set_num_threads(job.threads)
        record = dict(resolve(job.target)(**job.kwargs))
    except Exception as e:  # whatever breaks a run is that run's result, not the batch's
        if not catch:
            raise
        traceback.print_exc()
        record = dict(error=f"{type(e).__name__}: {e}")
    return dict(record, seconds=time.time() - t0)


def resolve(target: str) -> Callable:
    """The function a target names: ``package.module:function`` or ``file.py:function``."""
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        found = importlib.util.spec_from_file_location(path.stem, path)  # how to load it
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def _child_env() -> dict:
    """This environment, with the package this process runs from first on the path (a
    checkout's sources, not another installed copy) and one OpenMP thread unless asked (a job
    sets its own torch threads)."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


@contextlib.contextmanager
def _output_to(log: str | None):
    """Send everything this process prints (Python and C level alike) to ``log`` meanwhile."""
    if not log:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "w") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)


def _serve() -> int:
    """A worker's life: for each job-file path read from stdin, run that job and leave its
    record next to the job file (written whole, so the parent never reads half a record)."""
    for line in sys.stdin:
        order = json.loads(Path(line.strip()).read_text())
        with _output_to(order["log"]):
            record = call(Job(order["target"], order["target"], order["kwargs"],
                              threads=order["threads"]))
        result = Path(order["result"])
        partial = result.with_name(result.name + ".partial")
        partial.write_text(json.dumps(record, default=str))
        os.replace(partial, result)
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
