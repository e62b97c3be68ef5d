"""The training engine every training command runs: one loop, one resume, one checkpoint writer.

A recipe (``recipes/pretrain.py``, ``recipes/finetune.py``, ``transfer/engine.py`` for
detection and segmentation) builds its parts (data, model, optimizer, schedule) and a
``forward(model, batch, key) -> (loss, images)`` function, and hands them to a ``Trainer``, in
the shape of the official ``main_*.py`` / ``engine_*.py`` pairs; ``loss`` may be a dict with
"loss" and its parts (a detector's RPN and RoI losses), the parts then logged per step too.
Everything that must behave identically in every command lives here, written once:

- ``Trainer.train_one_epoch``: skipping the part of an epoch a resumed run already did,
  gradient accumulation, the non-finite-loss stop, per-step logging (JSON lines, TensorBoard,
  progress bar), ``save_every_steps`` and ``max_steps``;
- ``Trainer.resume``: newest intact checkpoint, refusal of a resume whose arguments would
  change the run, model / optimizer / EMA / RNG / position restore; ``config.yaml``;
- ``Trainer.save_state``: the run state (gathered from FSDP shards when sharded), keep-last-K;
- ``Trainer.epochs``: the epochs left to train, with the progress bar, so that a recipe's main
  is a straight line: ``for epoch in trainer.epochs(n): train_one_epoch; evaluate; save_state``.

Exact resume rests on three facts: the sample order and each sample's augmentation are
functions of (seed, epoch, index) (``data_order``), the lr is a function of the step
(``schedule``), and the RNG states are saved and restored at step boundaries, where the loop
is in the same state whether it ran through or restarted.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..models.model import apply_grad_checkpointing
from . import distributed as D
from . import fsdp
from .config import RunConfig, check_run_config, compare_resumed_args
from .metrics import MetricsLog, Throughput
from .output import check_output, prepare_output
from ..checkpoint.atomic import atomic_write_bytes
from .replay import write_run_config
from .runstate import (apply_run_state, build_run_state, checkpoint_path, load_resume_state,
                       load_run_state, plain, save_run_state)
from .step import AccumulatingStep, check_amp


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf: training stopped before the optimizer applied it."""

    def __init__(self, step: int, epoch: int, value: float, checkpoint: Path | None):
        self.step, self.epoch, self.value, self.checkpoint = step, epoch, value, checkpoint
        kept = (f"the last good checkpoint is {checkpoint}" if checkpoint
                else "no checkpoint had been written yet")
        super().__init__(f"non-finite loss ({value}) at optimizer step {step} (epoch {epoch}); "
                         f"stopped without applying it; {kept}. Lower the learning rate "
                         f"(--lr), lengthen the warmup (--warmup-steps), clip gradients "
                         f"(--clip-grad), or try --amp none.")


class DiskFullError(RuntimeError):
    """A checkpoint write ran out of space: the temp file is gone, the older checkpoints are
    kept (they are pruned only after a write succeeds)."""

    def __init__(self, target: Path, checkpoint: Path | None, reason: str):
        kept = (f"the last good checkpoint is {checkpoint}" if checkpoint
                else "no checkpoint had been written yet")
        super().__init__(f"disk full while writing {target} ({reason}); nothing half-written "
                         f"was left and {kept}. Free space in {target.parent}, then continue "
                         f"with --resume auto.")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk is full: ``OSError`` ENOSPC / EDQUOT, or the
    ``RuntimeError`` torch.save's zip writer raises for any failed write ("file write failed",
    from inline_container.cc), which on a healthy file system means no space."""
    import errno

    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "file write failed" in text or "inline_container" in text)


# what ends a training command with exit status 1 and one line (not a usage error)
TRAINING_FAILURES = (NonFiniteLossError, DiskFullError)


@dataclass
class Position:
    """Where a run is: ``batches_done`` micro-batches into the 0-based ``epoch``, after
    ``global_step`` optimizer steps."""
    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0


@dataclass(frozen=True)
class StepKey:
    """What a forward may key its randomness on (mixup draws, masks)."""
    epoch: int
    step: int    # optimizer steps done before this micro-batch
    micro: int   # micro-batch index within the accumulation


# -- process-wide settings -----------------------------------------------------------------------
def seed_everything(seed: int, rank: int = 0) -> None:
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    random.seed(seed + rank)


def set_deterministic(enabled: bool) -> bool:
    """Turn torch's deterministic algorithms on or off; returns the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)
    return previous


def worker_init(worker_id: int) -> None:
    """Seed numpy/python in loader workers from torch's per-worker seed (itself derived from
    the loader's seeded generator). Augmentation is keyed per sample on top of this."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def check_log_dir(log_dir: str | None) -> None:
    if log_dir:
        try:
            import tensorboard  # noqa: F401  (only its presence is checked here)
        except ImportError:
            raise ValueError(f"--log-dir {log_dir}: TensorBoard logging needs the tensorboard "
                             f"package (pip install tensorboard); metrics.jsonl is written "
                             f"without it") from None


@contextlib.contextmanager
def run_session(cfg: RunConfig) -> Iterator[tuple[D.DistInfo, Path]]:
    """Everything around a run: option and output checks (read-only, before any write), the
    process group, the output folder (created; an old run moved aside under ``overwrite``;
    temp files of interrupted checkpoint writes removed), determinism and seeds; undone at
    the end. Yields ``(dist info, output folder)``."""
    check_run_config(cfg)
    check_log_dir(cfg.log_dir)
    out = check_output(cfg)
    info = D.init_distributed(cfg.device)
    previous = set_deterministic(cfg.deterministic)
    finished = False
    try:
        check_amp(cfg.amp or "none", info.device)
        if info.is_main:
            prepare_output(cfg, out)
        D.barrier()
        seed_everything(cfg.seed, info.rank)
        yield info, out
        finished = True
    finally:
        set_deterministic(previous)
        if finished:  # every rank done before the group goes: rank 0 may still be writing
            D.barrier()  # its files while the others tear down (gloo then aborts a rank)
        D.cleanup_distributed()


# -- logging -------------------------------------------------------------------------------------
class RunLog:
    """Per-step and per-epoch records: JSON lines in the run folder (cut back to the resumed
    step on resume), mirrored to TensorBoard under ``log_dir`` when given. Rank 0 only."""

    def __init__(self, out: Path, *, step_file: str, epoch_file: str | None = None,
                 resume_step: int | None = None, enabled: bool = True,
                 log_dir: str | None = None):
        self.steps = MetricsLog(out / step_file, resume_step=resume_step, enabled=enabled)
        self.epochs = (MetricsLog(out / epoch_file, resume_step=resume_step, enabled=enabled)
                       if epoch_file else None)
        self.tb = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: lazy
            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def step(self, record: dict) -> None:
        self.steps.log(record)
        self._scalars("train", record, record["step"])

    def epoch(self, record: dict) -> None:
        if self.epochs is not None:
            self.epochs.log(record)
        self._scalars("epoch", record, record["step"])

    def record(self, prefix: str, record: dict) -> None:
        """Another kind of record at ``record["step"]`` (an evaluation a recipe runs now and
        then): a line in the step file, scalars under ``prefix/`` in TensorBoard."""
        self.steps.log(record)
        self._scalars(prefix, record, record["step"])

    def image(self, tag: str, png: Path | None, step: int) -> None:
        """A figure already written as PNG (e.g. a reconstruction grid) as a TensorBoard image."""
        if self.tb is None or png is None:
            return
        from PIL import Image
        with Image.open(png) as im:
            self.tb.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def _scalars(self, prefix: str, record: dict, step: int) -> None:
        if self.tb is None:
            return
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.steps.close()
        if self.epochs is not None:
            self.epochs.close()
        if self.tb is not None:
            self.tb.close()


# -- the engine ----------------------------------------------------------------------------------
class Trainer:
    """Runs a recipe's ``forward`` over epochs; owns the position, checkpoints and step log.

    Args:
        model: the module whose weights are trained and saved (not DDP-wrapped or compiled).
        loader: the training batches; ``loader.sampler`` and ``loader.dataset`` take
            ``set_epoch`` (``ResumableSampler``, ``KeyedAugmentDataset``).
        optimizer, schedule: the schedule's ``step(global_step)`` sets and returns the lr;
            ``cfg.warmup_steps``, when set, replaces its ``warmup_steps`` (the shared option).
        cfg: the run's config (accumulation, precision, checkpoints, logging fields).
        info: the process's place in the run.
        out: the run folder.
        args: what the run states record as the run's arguments (compared on resume).
        batches_per_epoch: micro-batches per epoch (a multiple of ``cfg.accum_steps``).
        total_steps: optimizer steps of the whole schedule; ``cfg.max_steps`` may stop sooner.
        ema: a timm ``ModelEmaV3`` updated after every optimizer step, saved with the state.
        clip_grad: gradient-norm clipping, None for none.
        find_unused_parameters: for DDP, when some parameters may get no gradient in a step
            (a detector's mask head on a crop without objects).
        step_fields: extra per-step record fields (e.g. skipped images), called at each step.
        train_mode: puts the model in training mode before each epoch (default
            ``model.train()``; a linear probe keeps its frozen encoder in eval mode).

    The recipe's own resumable state (best accuracy, per-epoch records; plain types) is handed
    to ``save_state(extra=...)`` and is ``self.extra`` after ``resume``; saves inside an epoch
    (``save_every_steps``, ``max_steps``) carry the last one given.
    """

    def __init__(self, *, model: torch.nn.Module, loader, optimizer, schedule, cfg: RunConfig,
                 info: D.DistInfo, out: Path, args: dict, batches_per_epoch: int,
                 total_steps: int, images_per_step: int, ema=None,
                 clip_grad: float | None = None, desc: str = "train",
                 step_fields: Callable[[], dict] = dict,
                 train_mode: Callable[[], None] | None = None,
                 find_unused_parameters: bool = False):
        self.model, self.loader, self.optimizer, self.schedule = model, loader, optimizer, schedule
        self.cfg, self.info, self.out, self.args = cfg, info, out, args
        self.batches_per_epoch, self.images_per_step = batches_per_epoch, images_per_step
        self.stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
        self.ema, self.desc, self.step_fields = ema, desc, step_fields
        self.extra: dict = {}  # the recipe's resumable state (see the class docstring)
        self.train_mode = train_mode or model.train
        if cfg.warmup_steps is not None:
            schedule.warmup_steps = int(cfg.warmup_steps)
        self.train_model = self._wrap(model, find_unused_parameters)
        self.stepper = AccumulatingStep(self.train_model, optimizer, accum_steps=cfg.accum_steps,
                                        amp=cfg.amp or "none", device=info.device,
                                        clip_grad=clip_grad)
        self.pos = Position()
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self.lr = self.last_loss = float("nan")
        self.loss_sum, self.seen = 0.0, 0  # this epoch's sample-weighted loss, across resumes
        self.log: RunLog | None = None
        self._bar = None

    def _wrap(self, model, find_unused_parameters: bool):
        """What the forward runs: gradient checkpointing switched on in the model when asked,
        DDP around the model (FSDP shards in place instead), then ``torch.compile`` when
        asked; checkpoints always read ``self.model``."""
        if self.cfg.grad_checkpointing and not apply_grad_checkpointing(
                model, self.cfg.grad_checkpointing):
            raise ValueError(f"--grad-checkpointing: {type(model).__name__} has no ConvNeXt "
                             f"stages to checkpoint")
        ddp_options = dict(find_unused_parameters=True) if find_unused_parameters else {}
        wrapped = model if self.cfg.fsdp else D.wrap_ddp(model, self.info, **ddp_options)
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def say(self, *parts) -> None:
        if self.info.is_main:
            (self._bar.write if self._bar is not None else print)(
                " ".join(map(str, parts)))

    # -- resume and save -------------------------------------------------------------------------
    def resume(self, must_match: Sequence[str] = (), may_change: Sequence[str] = ()) -> bool:
        """Continue from ``cfg.resume`` (see ``load_resume_state``); False for a fresh start.

        Arguments in ``must_match`` that differ from the saved run's refuse the resume (the
        run would silently become another run); ``may_change`` ones are reported. Then, the
        run being on, ``config.yaml`` records its options (``training.replay``)."""
        resumed = self._resume(must_match, may_change)
        if self.info.is_main:  # the run is on: record the options that repeat it
            write_run_config(self.cfg, self.out)
        return resumed

    def _resume(self, must_match: Sequence[str], may_change: Sequence[str]) -> bool:
        resume, info = self.cfg.resume, self.info
        path, state = (load_resume_state(resume, self.out, warn=self.say) if info.is_main
                       else (None, None))
        path = D.broadcast_object(path)
        if path is None:
            if resume == "auto":
                self.say(f"--resume auto: no checkpoint in {self.out}, starting fresh")
            return False
        if state is None:
            state = load_run_state(path)
        refused, warned = compare_resumed_args(state.get("args", {}), self.args, must_match,
                                               may_change)
        if refused:
            raise ValueError(f"--resume {resume}: {path.name} belongs to a run with other "
                             f"{', '.join(refused)}; resume with the saved options, or start a "
                             f"new --output")
        if warned:
            self.say("note: resuming with changed " + ", ".join(warned))
        saved_world = state.get("extra", {}).get("world_size", info.world_size)
        if saved_world != info.world_size:
            self.say(f"note: the checkpoint was written by {saved_world} process(es), this run "
                     f"has {info.world_size}")
        self._apply(state, path)
        self.resumed_from = self.last_checkpoint = path
        self.say(f"resumed from {path}: epoch {self.pos.epoch + 1}, step {self.pos.global_step}")
        return True

    def _apply(self, state: dict, path: Path) -> None:
        apply = fsdp.apply_run_state if self.cfg.fsdp else apply_run_state
        try:
            pos = apply(state, model=self.model, optimizer=self.optimizer,
                        scaler=self.stepper.scaler)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"--resume {path}: its weights or optimizer do not fit this model "
                             f"({str(e).splitlines()[0]}); resume with the same model, shape "
                             f"and weight-decay options") from None
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        extra = state.get("extra", {})
        self.pos = Position(pos["epoch"], pos["batches_done"], pos["global_step"])
        if self.pos.batches_done >= self.batches_per_epoch:
            self.pos = Position(self.pos.epoch + 1, 0, self.pos.global_step)
        if self.pos.batches_done:
            self.loss_sum = float(extra.get("epoch_loss_sum", 0.0))
            self.seen = int(extra.get("epoch_seen", 0))
        self.extra = {k: v for k, v in extra.items() if k not in _ENGINE_EXTRA}

    def save_state(self, extra: dict | None = None) -> Path | None:
        """Write the run state at the current position (rank 0; with FSDP every rank helps
        gather the full weights), with the recipe's ``extra`` state (kept for later saves;
        None: the last one given). Returns the file on rank 0."""
        if extra is not None:
            self.extra = dict(extra)
        if self.cfg.fsdp:
            src_model, src_optim = fsdp.full_state_views(self.model, self.optimizer)
        else:
            src_model, src_optim = self.model, self.optimizer
        if self.info.is_main:
            pos = self.pos
            state = build_run_state(
                model=src_model, optimizer=src_optim, epoch=pos.epoch,
                batches_done=pos.batches_done, global_step=pos.global_step, args=self.args,
                scaler=self.stepper.scaler,
                data_order=dict(seed=self.cfg.seed, kind="distributed-sampler"),
                extra=dict(world_size=self.info.world_size, epoch_loss_sum=self.loss_sum,
                           epoch_seen=self.seen, **self.extra))
            state["ema"] = self.ema.module.state_dict() if self.ema is not None else None
            try:
                self.last_checkpoint = save_run_state(self.out, state,
                                                      keep_last=self.cfg.keep_last)
            except (OSError, RuntimeError) as e:
                if not is_disk_full(e):
                    raise
                raise DiskFullError(checkpoint_path(self.out, pos.global_step),
                                    self.last_checkpoint, _first_line(e)) from None
        D.barrier()
        return self.last_checkpoint

    def write_json(self, name: str, record: dict) -> Path | None:
        """A JSON record in the run folder (rank 0, written atomically): ``config.json`` at the
        start, ``summary.json`` (what the run ended with: its metrics, its options) at the end,
        which people read and ``convnextv2 push`` turns into a model card. Returns the file
        on rank 0."""
        if not self.info.is_main:
            return None
        return atomic_write_bytes(json.dumps(plain(record), indent=2).encode(), self.out / name)

    # -- the loop --------------------------------------------------------------------------------
    def open_log(self, step_file: str, epoch_file: str | None = None) -> RunLog:
        """The run's logs, cut back to the resumed step (call after ``resume``)."""
        resume_step = self.pos.global_step if self.resumed_from else None
        self.log = RunLog(self.out, step_file=step_file, epoch_file=epoch_file,
                          resume_step=resume_step, enabled=self.info.is_main,
                          log_dir=self.cfg.log_dir)
        return self.log

    @property
    def running(self) -> bool:
        return self.pos.global_step < self.stop_at

    def epochs(self, epochs: int) -> Iterator[int]:
        """The epochs still to train, numbered from 1, from where the run stands (after
        ``resume``) up to ``epochs``, ending early once ``max_steps`` is reached; the progress
        bar is shown meanwhile. A recipe's main is then a straight line::

            for epoch in trainer.epochs(cfg.epochs):
                if not trainer.train_one_epoch(forward):
                    break                  # max_steps stopped it inside the epoch (saved)
                metrics = evaluate(...)    # validation, figures
                trainer.save_state()       # the position is already the next epoch's start
        """
        if self.info.is_main and self.cfg.progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.stop_at, initial=min(self.pos.global_step, self.stop_at),
                             desc=self.desc, unit="step", dynamic_ncols=True)
        try:
            while self.pos.epoch < epochs and self.running:
                yield self.pos.epoch + 1
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def train_one_epoch(self, forward) -> bool:
        """The rest of the current epoch. ``forward(model, batch, key)`` returns the loss of a
        micro-batch (a tensor, or a dict with "loss" and its parts) and its number of images;
        it runs under autocast (and DDP's no_sync between accumulation steps). Returns True
        when the epoch ran to its end (the position is then the next epoch's start, what
        ``save_state`` records), False when the run's last step (``max_steps`` or the
        schedule's end) stopped it inside the epoch (its state is then saved)."""
        pos, stepper, loader = self.pos, self.stepper, self.loader
        loader.sampler.set_epoch(pos.epoch, skip=pos.batches_done * loader.batch_size)
        _keyed(loader.dataset).set_epoch(pos.epoch)
        if pos.batches_done == 0:
            self.loss_sum, self.seen = 0.0, 0
        self.train_mode()
        batches, losses, clock = iter(loader), [], Throughput()
        for b in range(pos.batches_done, self.batches_per_epoch):
            batch = next(batches)
            if stepper.micro == 0:
                self.lr = self.schedule.step(pos.global_step)
            with stepper.micro_batch():
                out, n = forward(self.train_model, batch,
                                 StepKey(pos.epoch, pos.global_step, stepper.micro))
            loss, values = _mean_losses(out)
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(pos.global_step + 1, pos.epoch + 1, values["loss"],
                                         self.last_checkpoint)
            losses.append(values)
            self.loss_sum += loss.item() * n
            self.seen += n
            if not stepper.backward(loss):
                continue
            pos.global_step += 1
            pos.batches_done = b + 1
            if self.ema is not None:
                self.ema.update(self.model, step=pos.global_step)
            self._log_step({k: sum(v[k] for v in losses) / len(losses) for k in losses[0]},
                           clock.rate(self.images_per_step))
            losses = []
            if pos.batches_done < self.batches_per_epoch:  # the recipe saves an epoch's end
                if not self.running:
                    self.save_state()
                    return False
                if self.cfg.save_every_steps and pos.global_step % self.cfg.save_every_steps == 0:
                    self.save_state()
        self.pos = Position(pos.epoch + 1, 0, pos.global_step)
        return True

    def _log_step(self, losses: dict[str, float], img_per_s: float) -> None:
        """One step's record: the loss and its parts (means over the micro-batches and the
        processes), lr, throughput and the recipe's ``step_fields``."""
        loss = self.last_loss = losses["loss"]
        record = dict(step=self.pos.global_step, epoch=self.pos.epoch + 1, **losses, lr=self.lr,
                      img_per_s=img_per_s, **self.step_fields())
        if self.log is not None:
            self.log.step(record)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(epoch=record["epoch"], loss=f"{loss:.4f}", lr=f"{self.lr:.2e}",
                                  img_s=f"{img_per_s:.0f}")


# what the engine itself keeps in a run state's "extra", apart from the recipe's state
_ENGINE_EXTRA = ("world_size", "epoch_loss_sum", "epoch_seen")


def _mean_losses(out) -> tuple[torch.Tensor, dict[str, float]]:
    """A forward's loss (a tensor, or a dict with "loss" and its parts): the tensor to
    backpropagate and every value as its mean over the processes, reduced together."""
    parts = dict(out) if isinstance(out, dict) else {"loss": out}
    loss = parts["loss"]
    stacked = torch.stack([torch.as_tensor(v, device=loss.device).detach().float().reshape(())
                           for v in parts.values()])
    means = D.all_reduce_mean(stacked).tolist()
    return loss, dict(zip(parts, means))


def _keyed(dataset):
    """The ``KeyedAugmentDataset`` in a (possibly wrapped) training dataset."""
    while not hasattr(dataset, "set_epoch"):
        dataset = dataset.dataset
    return dataset


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__
