"""What a fine-tuning run keeps after each epoch: validation scores, the best and last weight
files, the per-epoch records and curves, and the final summary.

``Progress`` is the part a resumed run must get back (the best top-1s so far and every epoch's
record): the loop hands ``progress.to_extra()`` to ``Trainer.save_state`` and rebuilds it with
``Progress.from_extra(trainer.extra)`` after a resume, so the best files keep their meaning.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from .. import training as T
from ..checkpoint import save_checkpoint
from ..models.model import ConvNeXtV2
from ..training import fsdp
from ..training.dist_eval import evaluate, evaluate_distributed
from .linear_probe import LinearProbe

# the weight files of each source: (best, last)
WEIGHT_FILES = {"model": ("best.safetensors", "last.safetensors"),
                "ema": ("best_ema.safetensors", "last_ema.safetensors")}
_EXTRA_KEY = "finetune_state"  # where the run states keep Progress (a JSON string)


@dataclass
class Progress:
    """The best validation top-1 overall (and its source and epoch), per source, and the
    per-epoch records."""
    best_top1: float = -1.0
    best_source: str | None = None
    best_epoch: int | None = None
    best_model_top1: float = -1.0
    best_ema_top1: float = -1.0
    history: list = field(default_factory=list)

    def to_extra(self) -> dict:
        return {_EXTRA_KEY: json.dumps(asdict(self))}

    @classmethod
    def from_extra(cls, extra: dict) -> "Progress":
        """The progress a run state recorded; a fresh one when there is none."""
        if _EXTRA_KEY not in extra:
            return cls()
        saved = json.loads(extra[_EXTRA_KEY])
        saved.setdefault("best_model_top1", saved.get("best_top1", -1.0))  # older run states
        return cls(**saved)

    def improve(self, source: str, top1: float, epoch: int) -> bool:
        """Record ``source``'s top-1 after ``epoch``; True when it beats that source's best."""
        improved = top1 > getattr(self, f"best_{source}_top1")
        if improved:
            setattr(self, f"best_{source}_top1", top1)
        if top1 > self.best_top1:
            self.best_top1, self.best_source, self.best_epoch = top1, source, epoch
        return improved


def validate(model: nn.Module, ema, val_loader, num_classes: int, run, info) -> dict:
    """Scores of each source, ``{"model": (scores, weights), "ema": ...}``: sharded weights are
    gathered into one copy that rank 0 scores (and saves); otherwise every rank scores its share
    of the validation set."""
    amp = run.amp or "none"
    if run.fsdp and info.distributed:
        config = dict(model.config)
        model = fsdp.unsharded_copy(model, lambda: ConvNeXtV2(**config), info.device,
                                    info.is_main)
        scores = T.broadcast_object(evaluate(model, val_loader, num_classes, info.device, amp)
                                    if info.is_main else None)
    else:
        scores = evaluate_distributed(model, val_loader, num_classes, info.device, amp)
    scored = {"model": (scores, model)}
    if ema is not None:
        scored["ema"] = (evaluate_distributed(ema.module, val_loader, num_classes, info.device,
                                              amp), ema.module)
    return scored


def score_fields(scored: dict) -> dict:
    """The epoch record's validation fields: ``val_*`` of the model, ``ema_val_*`` of the EMA."""
    fields = {}
    for source, (scores, _) in scored.items():
        prefix = "val_" if source == "model" else f"{source}_val_"
        fields.update({prefix + k: scores[k] for k in ("loss", "top1", "top5")})
    return fields


def save_weights(module: nn.Module, path: Path, metadata: dict) -> None:
    """Native safetensors with ``metadata`` (as strings: lists and numbers as JSON); a
    linear-probe head is folded into one Linear first."""
    if isinstance(getattr(module.head, "fc", None), nn.Sequential):
        module = LinearProbe.folded(module)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    save_checkpoint(module, path, layout="native", metadata=meta)


def plot_history(history: list, out: Path) -> None:
    """``accuracy.png`` and ``loss.png`` from the per-epoch records."""
    T.plot_curves(history, out / "accuracy.png", keys=("val_top1", "ema_val_top1"), x="epoch",
                  title="validation top-1 (%)")
    T.plot_curves(history, out / "loss.png", keys=("train_loss", "val_loss", "ema_val_loss"),
                  x="epoch", title="loss")


def epoch_message(record: dict, epochs: int) -> str:
    msg = (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, "
           f"val top-1 {record['val_top1']:.2f}%")
    if "ema_val_top1" in record:
        msg += f", EMA top-1 {record['ema_val_top1']:.2f}%"
    return msg


def summarise(progress: Progress, run, trainer: T.Trainer, data, ema, **facts) -> dict:
    """``summary.json`` (rank 0) and the returned dict, which also holds the trained modules:
    the model (one gathered copy when sharded, a probe folded to a plain classifier), the EMA
    and the history."""
    info, out, model = trainer.info, trainer.out, trainer.model
    best_file = WEIGHT_FILES["ema" if progress.best_source == "ema" else "model"][0]
    summary = dict(best_top1=progress.best_top1, best_source=progress.best_source,
                   best_epoch=progress.best_epoch, best_model_top1=progress.best_model_top1,
                   best_ema_top1=progress.best_ema_top1 if ema is not None else None,
                   epochs=run.epochs, final=progress.history[-1] if progress.history else None,
                   classes=data.classes, output=str(out), skipped_images=data.skipped_now(),
                   recipe=run.recipe, best=str(out / best_file),
                   last=str(out / WEIGHT_FILES["model"][1]), rank=info.rank,
                   global_step=trainer.pos.global_step, **facts)
    trainer.write_json("summary.json", summary)
    if run.fsdp and info.distributed:
        config = dict(model.config)
        model = fsdp.unsharded_copy(model, lambda: ConvNeXtV2(**config), info.device,
                                    info.is_main)
    if run.linear_probe and model is not None:
        model = LinearProbe.folded(model)
    return dict(summary, model=model, ema=ema.module if ema is not None else None,
                history=progress.history)
