"""Supervised fine-tuning of ConvNeXt V2 (the official recipe, docs/recipes.md) and linear probing.

``finetune(FinetuneConfig(...))`` runs the whole job and returns a summary; ``convnextv2
finetune`` is its command line. Every recipe value comes from a preset (``recipes.presets``),
one per model size (``auto``: the preset of the variant nearest to the model trained), unless
the config sets it; ``resolve`` fills the config once, before anything is written. The main
reads top to bottom: build the data, the model, its optimizer and schedule and the
``Trainer``, then the loop: train an epoch, validate, keep the best weights, save the run state.
The loop's mechanics (resume, checkpoints, step logs) are the training engine's.

Written under ``output``: ``config.json`` (the options, the preset used and every resolved
value), ``metrics.jsonl`` (one line per epoch), ``steps.jsonl`` (one line per optimizer step),
``accuracy.png`` and ``loss.png``, ``best.safetensors`` (the model weights with the best
validation top-1) and ``best_ema.safetensors`` (the EMA weights with the best top-1, when EMA
is on), ``last.safetensors`` / ``last_ema.safetensors`` (after the last epoch), run states
``checkpoint-<step>.pt`` for ``--resume`` and ``summary.json``. The safetensors files are
native checkpoints carrying the class names, image size and preset in their metadata.

Sample order, augmentation and mixup/cutmix are keyed (``finetune_data``), so a run resumed
mid-epoch repeats the uninterrupted run's per-step losses (bit for bit with ``deterministic``
on CPU).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .. import training as T
from ..training import fsdp
from .finetune_config import (RESUME_MAY_CHANGE, RESUME_MUST_MATCH, FinetuneConfig,
                              check_hyperparameters, hyperparameters, resolve, saved_args)
from .finetune_data import FinetuneData, build_data, build_transforms, keyed_mixup
from .finetune_model import build_finetune_model, build_optimizer, finetune_architecture
from .finetune_results import (WEIGHT_FILES, Progress, epoch_message, plot_history,
                               save_weights, score_fields, summarise, validate)
from .linear_probe import LinearProbe


@dataclass
class Plan:
    """Everything decided before the run starts (and before anything is written)."""
    run: FinetuneConfig      # the resolved config: what the run reads
    args: dict               # the options as given, recorded in the run states
    arch: dict               # the model's constructor arguments
    transforms: tuple        # training and evaluation


def plan(cfg: FinetuneConfig) -> Plan:
    """Resolve the architecture, the preset and the transforms, and check every value, without
    writing anything: a refused run leaves ``--output`` as it was."""
    arch = finetune_architecture(cfg.model, cfg.finetune, **cfg.architecture())
    named = cfg.model and not any(k in cfg.architecture() for k in ("depths", "dims"))
    run = resolve(cfg, None if named else arch["depths"], None if named else arch["dims"])
    check_hyperparameters(run)
    return Plan(run, saved_args(cfg, run), arch,
                build_transforms(run, arch.get("in_chans", 3)))


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one fine-tuning job (see the module docstring for what it writes).

    Launched by ``torchrun`` it trains data-parallel (each rank evaluates its share of the
    validation set, every image counted once; rank 0 writes), or sharded with ``fsdp``. A run
    state is saved after every epoch and every ``save_every_steps`` optimizer steps;
    ``resume="auto"`` continues after the newest intact one.
    """
    T.check_run_config(cfg)  # the shared options first, then the recipe's
    p = plan(cfg)
    with T.run_session(p.run) as (info, out):
        return _finetune(p, info, out)


def _finetune(p: Plan, info: T.DistInfo, out: Path) -> dict:
    """Build the data, the model (a probe's frozen one), optimizer, EMA, schedule and Trainer,
    resume, record ``config.json``; then run the loop."""
    from timm.utils import ModelEmaV3

    run = p.run
    data = build_data(run, p.transforms, info)
    model, load_report = build_finetune_model(
        run.model, data.num_classes, run.finetune, drop_path=run.drop_path,
        head_init_std=run.head_init_std, **p.arch)
    probe = LinearProbe(model, data.num_classes) if run.linear_probe else None
    model.to(info.device)
    if run.fsdp:  # before the optimizer: sharding replaces the parameters
        fsdp.shard(model, info)
    eff = T.effective_batch(run.batch_size, run.accum_steps, info.world_size)
    base_lr = run.lr if run.lr is not None else T.scaled_lr(run.blr, eff)
    optimizer = build_optimizer(model, run, base_lr)
    ema = (ModelEmaV3(model, decay=run.model_ema_decay, use_warmup=run.model_ema_warmup)
           if run.model_ema else None)
    steps_per_epoch = data.batches_per_epoch // run.accum_steps
    schedule = T.WarmupCosineSchedule(optimizer, base_lr=base_lr, epochs=run.epochs,
                                      steps_per_epoch=steps_per_epoch,
                                      warmup_epochs=run.warmup_epochs,
                                      warmup_steps=run.warmup_steps, min_lr=run.min_lr)
    args = dict(p.args, effective_batch=eff)
    trainer = T.Trainer(
        model=model, loader=data.loader, optimizer=optimizer, schedule=schedule, cfg=run,
        info=info, out=out, args=args, batches_per_epoch=steps_per_epoch * run.accum_steps,
        total_steps=run.epochs * steps_per_epoch, images_per_step=eff, ema=ema,
        clip_grad=run.clip_grad, desc="finetune",
        train_mode=probe.train_mode if probe else None)
    trainer.resume(RESUME_MUST_MATCH, RESUME_MAY_CHANGE)
    trainer.write_json("config.json", dict(
        config=args, hyperparameters=hyperparameters(run), base_lr=base_lr,
        effective_batch=eff, world_size=info.world_size, model_config=model.config,
        classes=data.classes, load_report=load_report, skipped_images=data.skipped))
    if info.is_main:
        if data.skipped:
            trainer.say(f"note: skipped {data.skipped} unreadable image(s) in {run.data} "
                        f"(--strict-data makes them fatal)")
        if load_report.get("stem", "loaded") != "loaded":
            trainer.say(f"note: --finetune {run.finetune}: stem {load_report['stem']}")
    meta = dict(class_names=data.classes, img_size=run.img_size,  # of every weight file
                in_chans=p.arch.get("in_chans", 3), recipe=run.recipe, data=str(run.data),
                linear_probe=run.linear_probe)
    return _train(run, trainer, data, ema, meta, base_lr)


def _train(run: FinetuneConfig, trainer: T.Trainer, data: FinetuneData, ema, meta: dict,
           base_lr: float) -> dict:
    """The loop: train an epoch, validate, keep the best and last weights, log, save the state
    (with the progress a resume needs back)."""
    info, out = trainer.info, trainer.out
    forward = _forward(run, data, info.device)
    progress = Progress.from_extra(trainer.extra)  # the saved one after a resume
    t_start = t_epoch = time.time()
    with trainer.open_log("steps.jsonl", "metrics.jsonl") as log:
        for epoch in trainer.epochs(run.epochs):
            if not trainer.train_one_epoch(forward):
                break
            record = _train_fields(trainer, data, epoch, time.time() - t_epoch)
            scored = validate(trainer.model, ema, data.val_loader, data.num_classes, run, info)
            record.update(score_fields(scored), epoch_time_s=time.time() - t_epoch)
            progress.history.append(record)
            for source, (scores, weights) in scored.items():
                improved = progress.improve(source, scores["top1"], epoch)
                if info.is_main:
                    _save_epoch_weights(weights, out, source, improved,
                                        dict(meta, epoch=epoch, weights=source,
                                             top1=scores["top1"]))
            if info.is_main:
                log.epoch(record)
                plot_history(progress.history, out)
                if run.progress:
                    trainer.say(epoch_message(record, run.epochs))
            t_epoch = time.time()
            trainer.save_state(extra=progress.to_extra())
    return summarise(progress, run, trainer, data, ema, base_lr=base_lr,
                     train_time_s=time.time() - t_start)


def _train_fields(trainer: T.Trainer, data: FinetuneData, epoch: int, seconds: float) -> dict:
    """The epoch record's training fields (the loss is the epoch's sample-weighted mean)."""
    return dict(step=trainer.pos.global_step, epoch=epoch,
                train_loss=trainer.loss_sum / max(trainer.seen, 1), lr=trainer.lr,
                img_per_s=trainer.seen * trainer.info.world_size / max(seconds, 1e-9),
                skipped_images=data.skipped_now())


def _save_epoch_weights(weights: nn.Module, out: Path, source: str, improved: bool,
                        meta: dict) -> None:
    """The source's last weights, and its best ones when this epoch improved them."""
    best, last = WEIGHT_FILES[source]
    if improved:
        save_weights(weights, out / best, meta)
    save_weights(weights, out / last, meta)


def _forward(run: FinetuneConfig, data: FinetuneData, device):
    """What one micro-batch computes: mixup/cutmix keyed by the step, logits, the loss."""
    criterion = _criterion(run, data.mixup_fn is not None)

    def forward(train_model, batch, key):
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if data.mixup_fn is not None:
            x, y = keyed_mixup(data.mixup_fn, x, y, run.seed, key.step, key.micro)
        return criterion(train_model(x).float(), y), len(x)
    return forward


def _criterion(run: FinetuneConfig, mixup_active: bool):
    """Soft-target cross-entropy under mixup/cutmix (the targets carry the smoothing), else
    label smoothing when the recipe asks for it, else plain cross-entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_active:
        return SoftTargetCrossEntropy()
    if run.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=run.smoothing)
    return nn.CrossEntropyLoss()
