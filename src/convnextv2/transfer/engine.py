"""The training loop of ``convnextv2 detect train`` and ``convnextv2 segment train``.

One loop serves both tasks; a ``Task`` object supplies what differs (datasets, model, loss,
evaluation). The loop itself follows the package's classification conventions, built from the
shared pieces in ``convnextv2.training``:

- a new run needs an empty (or new) output folder; ``--resume auto`` continues the newest
  ``checkpoint-*.pt`` in it, exactly (model, optimizer, schedule position, RNG states, and the
  sample order and augmentation, which depend only on seed, epoch and index);
- AdamW over layer-decayed parameter groups, a per-iteration poly / step / cosine schedule;
- bf16 autocast (fp16 with loss scaling on GPUs), optional gradient clipping;
- torchrun DDP: each process trains on its share, evaluation is sharded and combined;
- ``metrics.jsonl`` (one line per logged step and per evaluation), ``curves.png``,
  atomic checkpoints, and at the end ``model.pt``: the trained weights with the configuration
  that rebuilds the model (``convnextv2 detect|segment eval|predict --checkpoint``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from .. import training as T
from ..training.dist_eval import sharded_loader
from .errors import DataError
from ..training.layer_decay import MODES as DECAY_MODES
from ..training.layer_decay import default_num_layers, param_groups_layer_decay

MODEL_FORMAT = "convnextv2-transfer-model-1"


@dataclass
class TransferConfig:
    """Options of a transfer training run (``None``: the task's recipe value)."""
    output: str = "runs/transfer"
    data: str = "builtin"
    model: str | None = None              # backbone variant; None: the checkpoint's shape
    pretrained: str | None = None         # backbone weights, any layout the package reads
    depths: Sequence[int] | None = None   # custom backbone shape (tests, demos)
    dims: Sequence[int] | None = None
    stem_stride: int | None = None
    drop_path: float = 0.0
    epochs: int | None = None             # training length in epochs ...
    iters: int | None = None              # ... or in optimizer steps
    batch_size: int = 2                   # per process
    eval_batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    layer_decay_mode: str = "layer_wise"
    num_layers: int | None = None         # None: 3 + ceil(depths[2] / 3)
    schedule: str = "poly"
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    min_lr: float = 0.0
    clip_grad: float | None = None
    amp: str = "none"
    device: str | None = None
    workers: int = 2
    seed: int = 0
    resume: str | None = None
    eval_interval: int | None = None      # optimizer steps between evaluations; None: per epoch
    save_interval: int | None = None      # steps between checkpoints; None: with evaluations
    keep_last: int = 2
    log_interval: int = 10
    max_steps: int | None = None          # stop early after this many steps (smoke tests)
    progress: bool = True
    task_options: dict = field(default_factory=dict)


class Task:
    """What a transfer task supplies to the loop."""
    name = "task"
    primary_metric = "metric"
    find_unused_parameters = False

    def datasets(self, cfg: TransferConfig):  # -> (train, val), each with .classes
        raise NotImplementedError

    def collate(self, train: bool):
        raise NotImplementedError

    def build_model(self, cfg: TransferConfig, classes: list[str]) -> torch.nn.Module:
        raise NotImplementedError

    def losses(self, model, batch, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model, loader, dataset, cfg, info) -> dict[str, float]:
        raise NotImplementedError

    def prepare_distributed(self, model, info):
        return model


def check_new_output(output: str | Path, resume: str | None) -> Path:
    """The output folder, created; a folder that already holds files is refused unless the
    run resumes, so a new run never overwrites an old one."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise ValueError(f"--output {out} already holds files from another run; pick a new "
                         f"folder, or pass --resume auto to continue that run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as e:
        raise PermissionError(f"--output {out}: cannot write there ({e.strerror or e})") from None
    return out


def worker_error(e: Exception) -> Exception:
    """A DataError raised inside a DataLoader worker arrives re-wrapped with the worker's
    traceback in its message; recover the one-line original."""
    text = str(e)
    if "DataLoader worker" in text and "DataError:" in text:
        return DataError(text.rsplit("DataError:", 1)[1].strip().splitlines()[0])
    return e


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


def _loader(dataset, sampler, cfg, collate, info, batch_size, drop_last=True):
    # its own generator: starting an iterator draws a seed, which must not come from the
    # global RNG that drop path uses, or a resumed run would diverge from an uninterrupted one
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=cfg.workers, persistent_workers=False,
                      pin_memory=info.device.type == "cuda", drop_last=drop_last,
                      generator=torch.Generator().manual_seed(cfg.seed))


def train(task: Task, cfg: TransferConfig) -> dict:
    """Run ``task``'s training as configured; returns a summary with the final metrics."""
    info = T.init_distributed(cfg.device)
    try:
        T.check_amp(cfg.amp, info.device)
        if cfg.layer_decay_mode not in DECAY_MODES:
            raise ValueError(f"--layer-decay-mode {cfg.layer_decay_mode!r}: choose one of "
                             f"{', '.join(DECAY_MODES)}")
        if not (cfg.epochs or cfg.iters):
            raise ValueError("give the training length: --epochs N or --iters N")
        out = check_new_output(cfg.output, cfg.resume) if info.is_main else Path(cfg.output)
        T.barrier()
        return _train(task, cfg, info, out)
    finally:
        T.cleanup_distributed()


def _say(info, text: str) -> None:
    if info.is_main:
        print(text, flush=True)


def _train(task: Task, cfg: TransferConfig, info, out: Path) -> dict:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed + info.rank)
    train_set, val_set = task.datasets(cfg)
    classes = list(train_set.classes)
    keyed = T.KeyedAugmentDataset(train_set, cfg.seed)
    sampler = T.ResumableSampler(T.build_sampler(keyed, info, shuffle=True, seed=cfg.seed,
                                                 drop_last=True))
    loader = _loader(keyed, sampler, cfg, task.collate(True), info, cfg.batch_size)
    if len(loader) < 1:
        raise ValueError(f"{len(train_set)} training images are too few for one batch of "
                         f"{cfg.batch_size} x {info.world_size} processes; lower --batch-size")
    val_loader = sharded_loader(val_set, info, batch_size=cfg.eval_batch_size,
                                            collate_fn=task.collate(False),
                                            num_workers=cfg.workers,
                                            generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = len(loader)
    total = cfg.iters or cfg.epochs * steps_per_epoch
    eval_interval = cfg.eval_interval or steps_per_epoch if cfg.epochs else \
        (cfg.eval_interval or max(1, total // 10))
    save_interval = cfg.save_interval or eval_interval

    model = task.build_model(cfg, classes)
    config = dict(model.config, class_names=classes)
    depths = model.config["backbone"]["depths"]
    num_layers = cfg.num_layers or default_num_layers(depths, cfg.layer_decay_mode)
    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay,
                                      layer_decay=cfg.layer_decay, mode=cfg.layer_decay_mode,
                                      depths=depths, num_layers=num_layers, prefix="backbone.")
    model = task.prepare_distributed(model, info).to(info.device)
    ddp = T.wrap_ddp(model, info, find_unused_parameters=task.find_unused_parameters) \
        if info.distributed else model
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    stepper = T.AccumulatingStep(ddp, optimizer, accum_steps=1, amp=cfg.amp,
                                 device=info.device, clip_grad=cfg.clip_grad)
    schedule = T.WarmupDecaySchedule(optimizer, base_lr=cfg.lr, total_steps=total,
                                     kind=cfg.schedule,
                                     warmup_steps=min(cfg.warmup_iters, total // 2),
                                     warmup_ratio=cfg.warmup_ratio, min_lr=cfg.min_lr)

    epoch = batches_done = global_step = 0
    resume_path = T.broadcast_object(T.resolve_resume(cfg.resume, out) if info.is_main else None)
    if resume_path is not None:
        state = T.load_run_state(resume_path)
        try:
            pos = T.apply_run_state(state, model=model, optimizer=optimizer,
                                    scaler=stepper.scaler)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"--resume {resume_path}: it does not fit this model "
                             f"({str(e).splitlines()[0]}); resume with the same options") from None
        epoch, batches_done, global_step = pos["epoch"], pos["batches_done"], pos["global_step"]
        _say(info, f"resumed from {resume_path}: epoch {epoch}, step {global_step}")
    elif cfg.resume == "auto":
        _say(info, f"--resume auto: no checkpoint in {out}, starting fresh")
    log = T.MetricsLog(out / "metrics.jsonl", resume_step=global_step if resume_path else None,
                       enabled=info.is_main)
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    _say(info, f"{task.name}: {len(train_set)} training / {len(val_set)} validation images, "
               f"{len(classes)} classes; {total} steps of {cfg.batch_size} x {info.world_size}"
               f" images, lr {cfg.lr:g} ({cfg.schedule}), layer decay {cfg.layer_decay:g} "
               f"({cfg.layer_decay_mode}, {num_layers} layers), drop path {cfg.drop_path:g}, "
               f"device {info.device}")

    def checkpoint():
        if info.is_main:
            state = T.build_run_state(model=model, optimizer=optimizer, epoch=epoch,
                                      batches_done=batches_done, global_step=global_step,
                                      args=asdict(cfg), scaler=stepper.scaler,
                                      data_order=dict(seed=cfg.seed),
                                      extra=dict(config=config, classes=classes))
            T.save_run_state(out, state, keep_last=cfg.keep_last)
        T.barrier()

    last_eval: dict[str, float] = {}
    start = time.time()
    bar = tqdm(total=stop_at, initial=global_step, desc=f"{task.name} train",
               disable=not (cfg.progress and info.is_main), dynamic_ncols=True)
    running: dict[str, float] = {}
    try:
        while global_step < stop_at:
            keyed.set_epoch(epoch)
            sampler.set_epoch(epoch, skip=batches_done * cfg.batch_size)
            ddp.train()
            iterator = iter(loader)
            while global_step < stop_at:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                except Exception as e:  # a bad file met by a worker: one clear line
                    raise worker_error(e) from None
                lr = schedule.step(global_step)
                with stepper.micro_batch():
                    losses = task.losses(ddp, batch, info.device)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {global_step}; "
                                             f"lower --lr or set --clip-grad")
                stepper.backward(loss)
                batches_done += 1
                global_step += 1
                for k, v in losses.items():
                    running[k] = running.get(k, 0.0) + float(v.detach())
                running["_n"] = running.get("_n", 0) + 1
                bar.update(1)
                if global_step % cfg.log_interval == 0 or global_step == stop_at:
                    n = running.pop("_n")
                    record = dict(step=global_step, epoch=epoch, lr=lr,
                                  **{k: v / n for k, v in running.items()})
                    log.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                    running = {}
                if global_step % eval_interval == 0 or global_step == stop_at:
                    last_eval = task.evaluate(ddp, val_loader, val_set, cfg, info)
                    log.log(dict(step=global_step, epoch=epoch, split="val", **last_eval))
                    ddp.train()
                    if info.is_main:
                        bar.write(f"step {global_step}: " + ", ".join(
                            f"{k} {v:.2f}" for k, v in last_eval.items()
                            if k.endswith(("_AP", "_AP50", "_AP75", "mIoU", "Acc"))))
                if global_step % save_interval == 0 or global_step == stop_at:
                    if batches_done == steps_per_epoch:
                        epoch, batches_done = epoch + 1, 0
                    checkpoint()
            if batches_done >= steps_per_epoch:
                epoch, batches_done = epoch + 1, 0
    finally:
        bar.close()
        log.close()
    elapsed = time.time() - start
    if info.is_main:
        save_model_file(model, out / "model.pt", config, classes, last_eval)
        plot_run(out, task.primary_metric)
    T.barrier()
    _say(info, f"done in {elapsed:.0f} s; {task.primary_metric} "
               f"{last_eval.get(task.primary_metric, float('nan')):.2f}; weights in "
               f"{out / 'model.pt'}")
    return dict(output=str(out), steps=global_step, time_s=elapsed, metrics=last_eval,
                classes=classes)


def plot_run(out: Path, metric: str) -> None:
    """``curves.png`` (training losses) and ``val_curve.png`` (the validation metric)."""
    records = T.read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in records if r.get("split") != "val"]
    val_rows = [r for r in records if r.get("split") == "val"]
    loss_keys = sorted({k for r in train_rows for k in r if k.startswith("loss")})
    T.plot_curves(train_rows, out / "curves.png", keys=loss_keys, title="training losses")
    T.plot_curves(val_rows, out / "val_curve.png", keys=[metric], title=f"validation {metric}")

