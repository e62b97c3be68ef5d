"""The main of ``convnextv2 detect train`` and ``convnextv2 segment train``.

A ``Task`` (``detection/train.py``, ``segmentation/train.py``) supplies what differs: the
datasets, the model around the backbone, the losses of a batch and the evaluation. Everything
else is the training engine's (``training.loop.Trainer``), exactly as for pretraining and
fine-tuning: the output-folder rules (``--resume auto``, ``--overwrite``), exact resume with
refusal of run-changing options, gradient accumulation, AMP, per-step logs (``steps.jsonl``,
TensorBoard), ``--save-every-steps``, ``--keep-last``, ``--max-steps`` and the non-finite-loss
stop. This module builds the parts: AdamW over layer-decayed parameter groups
(``training.layer_decay``), a per-iteration poly / step / cosine schedule
(``training.schedule.WarmupDecaySchedule``), and the straight-line main.

Length: ``epochs``, or ``iters`` optimizer steps (the ADE20K recipe's 160k iterations); then
the schedule runs over ``iters`` steps, the last epoch stops part-way, and the run trains
``ceil(iters / steps per epoch)`` epochs. Evaluation runs every ``eval_every`` epochs and at
the end (also when ``--max-steps`` stops the run), one line per evaluation in
``metrics.jsonl``. At the end ``model.pt`` holds the trained weights with the configuration
that rebuilds the model (``convnextv2 detect|segment eval|predict --checkpoint``), and
``curves.png`` / ``val_curve.png`` plot the losses and the validation metric.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import training as T
from ..training.config import RunConfig
from ..training.dist_eval import sharded_loader
from ..training.layer_decay import check_mode, param_groups_layer_decay
from ..training.schedule import DECAYS
from .backbone import build_backbone

MODEL_FORMAT = "convnextv2-transfer-model-1"
# options that make a resumed run another run (refused; a task adds its own), and ones that
# only change its course (noted)
RESUME_MUST_MATCH = ("task", "model", "pretrained", "depths", "dims", "stem_stride", "in_chans",
                     "v1_block", "model_kwargs", "data", "seed", "effective_batch")
RESUME_MAY_CHANGE = ("epochs", "iters", "lr", "weight_decay", "layer_decay", "layer_decay_mode",
                     "num_layers", "schedule", "warmup_steps", "warmup_ratio", "min_lr",
                     "clip_grad", "drop_path", "amp", "eval_every", "eval_batch_size")


@dataclass
class TransferConfig(RunConfig):
    """Options of a detection or segmentation training run (the command line fills them from
    the task's recipe, ``recipes/presets.py``, and the flags)."""
    output: str = "runs/transfer"
    model: str | None = None              # backbone variant; None: the checkpoint's shape
    pretrained: str | None = None         # backbone weights, any layout the package reads
    batch_size: int | None = 2            # per process and micro-batch
    drop_path: float | None = 0.0
    epochs: int | None = None             # training length in epochs ...
    iters: int | None = None              # ... or in optimizer steps (wins when both are set)
    eval_every: int = 1                   # epochs between evaluations (and always at the end)
    eval_batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    layer_decay_mode: str = "layer_wise"
    num_layers: int | None = None         # None: 3 + ceil(depths[2] / 3)
    schedule: str = "poly"
    warmup_steps: int | None = 0          # at most half of the run is warmup
    warmup_ratio: float = 1e-6
    min_lr: float = 0.0
    clip_grad: float | None = None


class Task:
    """What a transfer task supplies to the main (see ``DetectionTask``, ``SegmentationTask``)."""
    name = "task"              # "detect" / "segment": the command, the run's "task" argument
    primary_metric = "metric"
    find_unused_parameters = False
    resume_must_match: tuple[str, ...] = ()  # keys of ``options`` a resume may not change

    def options(self) -> dict:
        """The task's settings, recorded with the run's arguments (compared on resume)."""
        return {}

    def datasets(self, cfg: TransferConfig):  # -> (train, val), each with .classes
        raise NotImplementedError

    def collate(self, train: bool):
        raise NotImplementedError

    def build_model(self, backbone, classes: list[str]) -> torch.nn.Module:
        raise NotImplementedError

    def losses(self, model, batch, device) -> dict[str, torch.Tensor]:
        """The batch's losses: "loss" (what is minimised) and its parts (logged per step)."""
        raise NotImplementedError

    def evaluate(self, model, loader, dataset, cfg, info) -> dict[str, float]:
        raise NotImplementedError

    def prepare_distributed(self, model, info):
        return model


def check_transfer_config(cfg: TransferConfig) -> None:
    """The recipe's own options, refused up front naming the flag and what it accepts."""
    check_mode(cfg.layer_decay_mode)
    if cfg.schedule not in DECAYS:
        raise ValueError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(DECAYS)}")
    if not (cfg.epochs or cfg.iters):
        raise ValueError("give the training length: --epochs N or --iters N")
    for flag, value in (("epochs", cfg.epochs), ("iters", cfg.iters),
                        ("eval-every", cfg.eval_every), ("eval-batch-size", cfg.eval_batch_size),
                        ("num-layers", cfg.num_layers)):
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    for flag, value in (("lr", cfg.lr), ("min-lr", cfg.min_lr), ("clip-grad", cfg.clip_grad),
                        ("weight-decay", cfg.weight_decay)):
        if value is not None and value < 0:
            raise ValueError(f"--{flag} must be >= 0, got {value}")
    if not 0 < cfg.layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {cfg.layer_decay}")


def train(task: Task, cfg: TransferConfig) -> dict:
    """Run ``task``'s training as configured; returns a summary with the final metrics.

    Every check, and the reading of the data, comes before the output folder is touched."""
    T.check_run_config(cfg)
    check_transfer_config(cfg)
    train_set, val_set = task.datasets(cfg)
    if cfg.pretrained:
        from ..checkpoint import resolve_checkpoint
        resolve_checkpoint(cfg.pretrained)  # a released name is fetched (or refused) first
    with T.run_session(cfg) as (info, out):
        return _main(task, cfg, (train_set, val_set), info, out)


def _loaders(task: Task, cfg: TransferConfig, train_set, val_set, info):
    """The training loader (order keyed by (seed, epoch), augmentation by (seed, epoch,
    index)) and the sharded validation loader. Each has its own generator: starting an
    iterator draws a seed, which must not come from the global RNG that drop path uses."""
    keyed = T.KeyedAugmentDataset(train_set, cfg.seed)
    sampler = T.ResumableSampler(T.build_sampler(keyed, info, shuffle=True, seed=cfg.seed,
                                                 drop_last=True))
    loader = DataLoader(keyed, batch_size=cfg.batch_size, sampler=sampler,
                        collate_fn=task.collate(True), num_workers=cfg.workers,
                        persistent_workers=False, pin_memory=info.device.type == "cuda",
                        drop_last=True, worker_init_fn=T.worker_init,
                        generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = len(loader) // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_set)} training images are too few for one step of "
                         f"{cfg.batch_size} x {cfg.accum_steps} (accum) x {info.world_size} "
                         f"processes; lower --batch-size or --accum-steps")
    val_loader = sharded_loader(val_set, info, batch_size=cfg.eval_batch_size,
                                collate_fn=task.collate(False), num_workers=cfg.workers,
                                generator=torch.Generator().manual_seed(cfg.seed))
    return loader, val_loader, steps_per_epoch


def _main(task: Task, cfg: TransferConfig, sets, info, out: Path) -> dict:
    """The recipe's main, a straight line: build the parts, resume, then per epoch train,
    evaluate (every ``eval_every``) and save; evaluate where a stop inside an epoch left it."""
    train_set, val_set = sets
    classes = list(train_set.classes)
    loader, val_loader, steps_per_epoch = _loaders(task, cfg, train_set, val_set, info)
    total = cfg.iters or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    model = task.build_model(build_backbone(cfg.model, cfg.pretrained, **cfg.architecture()),
                             classes)
    config = dict(model.config, class_names=classes)
    groups = param_groups_layer_decay(model, cfg.weight_decay, cfg.layer_decay,
                                      cfg.layer_decay_mode, config["backbone"]["depths"],
                                      cfg.num_layers, prefix="backbone.")
    model = task.prepare_distributed(model, info).to(info.device)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    schedule = T.WarmupDecaySchedule(optimizer, base_lr=cfg.lr, total_steps=total,
                                     kind=cfg.schedule, warmup_steps=cfg.warmup_steps or 0,
                                     warmup_ratio=cfg.warmup_ratio, min_lr=cfg.min_lr)
    eff = T.effective_batch(cfg.batch_size, cfg.accum_steps, info.world_size)
    args = dict(dataclasses.asdict(cfg), task=task.name, effective_batch=eff, **task.options())
    trainer = T.Trainer(
        model=model, loader=loader, optimizer=optimizer, schedule=schedule, cfg=cfg, info=info,
        out=out, args=args, batches_per_epoch=steps_per_epoch * cfg.accum_steps,
        total_steps=total, images_per_step=eff, clip_grad=cfg.clip_grad,
        desc=f"{task.name} train", find_unused_parameters=task.find_unused_parameters)
    trainer.resume(RESUME_MUST_MATCH + task.resume_must_match, RESUME_MAY_CHANGE)
    evaluation = _Evaluation(task, cfg, trainer, val_loader, val_set)
    trainer.say(f"{task.name}: {len(train_set)} training / {len(val_set)} validation images, "
                f"{len(classes)} classes; {total} steps ({epochs} epochs of {steps_per_epoch}) "
                f"of {eff} images, lr {cfg.lr:g} ({cfg.schedule}), layer decay "
                f"{cfg.layer_decay:g} ({cfg.layer_decay_mode}), device {info.device}")

    def forward(train_model, batch, key):
        return task.losses(train_model, batch, info.device), len(batch[0])

    start = time.time()
    extra = lambda: dict(config=config, classes=classes, **evaluation.state())  # noqa: E731
    trainer.extra.update(extra())  # saves inside the first epoch already carry the config
    with trainer.open_log("steps.jsonl", "metrics.jsonl") as log:
        for epoch in trainer.epochs(epochs):
            if not trainer.train_one_epoch(forward):
                break
            if epoch % cfg.eval_every == 0 or epoch == epochs:
                trainer.save_state(extra())  # kept should the evaluation fail
                evaluation.run(log)
            trainer.save_state(extra())
        if evaluation.step != trainer.pos.global_step:  # stopped inside an epoch
            evaluation.run(log)
            trainer.save_state(extra())  # the same step again, now with its evaluation
    return _finish(task, trainer, config, classes, evaluation.metrics, time.time() - start)


class _Evaluation:
    """Validation of the model: its record in ``metrics.jsonl``, its line on the console, and
    the part a resume restores (the last metrics and their step)."""

    def __init__(self, task: Task, cfg: TransferConfig, trainer: T.Trainer, loader, dataset):
        self.task, self.cfg, self.trainer = task, cfg, trainer
        self.info, self.out = trainer.info, trainer.out
        self.loader, self.dataset = loader, dataset
        extra = trainer.extra  # what a resumed run saved; empty for a fresh one
        self.metrics: dict[str, float] = dict(extra.get("eval_metrics") or {})
        self.step = int(extra.get("eval_step", -1))

    def state(self) -> dict:
        return dict(eval_metrics=dict(self.metrics), eval_step=self.step)

    def run(self, log: T.RunLog) -> None:
        """Evaluate at the current position. The RNG states are put back afterwards, so
        where evaluations happen (``--eval-every``, a ``--max-steps`` stop) never changes
        the training that follows."""
        trainer = self.trainer
        pos = trainer.pos
        rng = T.capture_rng_state()
        try:
            self.metrics = self.task.evaluate(trainer.model, self.loader, self.dataset,
                                              self.cfg, self.info)
        finally:
            T.restore_rng_state(rng)
        self.step = pos.global_step
        epoch = pos.epoch if pos.batches_done == 0 else pos.epoch + 1
        if self.info.is_main:
            log.epoch(dict(step=self.step, epoch=epoch, split="val", **self.metrics))
            plot_run(self.out, self.task.primary_metric)
        trainer.say(f"step {self.step}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in self.metrics.items()
            if k.endswith(("_AP", "_AP50", "_AP75", "mIoU", "Acc"))))


def _finish(task: Task, trainer: T.Trainer, config: dict, classes: list[str], metrics: dict,
            elapsed: float) -> dict:
    """``model.pt`` and the curves (rank 0), and the summary every process returns."""
    out, info = trainer.out, trainer.info
    if info.is_main:
        save_model_file(trainer.model, out / "model.pt", config, classes, metrics)
        plot_run(out, task.primary_metric)
    T.barrier()
    trainer.say(f"done in {elapsed:.0f} s; {task.primary_metric} "
                f"{metrics.get(task.primary_metric, float('nan')):.2f}; weights in "
                f"{out / 'model.pt'}")
    return dict(output=str(out), steps=trainer.pos.global_step, time_s=elapsed,
                metrics=metrics, classes=classes)


def save_model_file(model, path: Path, config: dict, classes: list[str],
                    metrics: dict | None = None) -> Path:
    """The trained model as a weights-only loadable dict: weights, rebuild config, classes."""
    model = getattr(model, "module", model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return T.atomic_torch_save(dict(format=MODEL_FORMAT, config=T.runstate.plain(config),
                                    classes=list(classes), metrics=dict(metrics or {}),
                                    model=state), path)


def read_model_file(path: str | Path, task: str) -> dict:
    """A ``model.pt`` (or a training ``checkpoint-*.pt``) as ``{config, classes, model}``."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = path / "model.pt"
        path = found if found.is_file() else (T.latest_checkpoint(path) or found)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file (give a run's model.pt, "
                                f"one of its checkpoint-*.pt, or the run folder)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and obj.get("format") == T.runstate.FORMAT:
        extra = obj.get("extra") or {}
        obj = dict(config=extra.get("config"), classes=extra.get("classes"), model=obj["model"])
    elif not (isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT):
        raise ValueError(f"{path} is not a trained {task} model of this package (a backbone "
                         f"checkpoint goes to --pretrained when training)")
    config = obj.get("config") or {}
    if config.get("task") != task:
        raise ValueError(f"{path} holds a {config.get('task', 'unknown')} model, not a {task} "
                         f"model")
    return obj


def plot_run(out: Path, metric: str) -> None:
    """``curves.png`` (the training losses of ``steps.jsonl``) and ``val_curve.png`` (the
    validation metric of ``metrics.jsonl``)."""
    steps = T.read_metrics(out / "steps.jsonl")
    loss_keys = sorted({k for r in steps for k in r if k.startswith("loss")})
    T.plot_curves(steps, out / "curves.png", keys=loss_keys, title="training losses")
    T.plot_curves(T.read_metrics(out / "metrics.jsonl"), out / "val_curve.png", keys=[metric],
                  title=f"validation {metric}")
