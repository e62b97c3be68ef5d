"""The options of a fine-tuning run, resolved against the presets once, and their checks.

A ``FinetuneConfig`` as given leaves most hyper-parameters ``None``: "the preset's value".
``resolve`` fills every one of them from the preset (``recipes.presets``) and returns a new
config, the only one the run reads from then on; ``check_hyperparameters`` refuses what cannot
train, before anything is written. The run records the options as given (``saved_args``:
what a resume compares) next to the resolved values (``hyperparameters``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..data import is_idx_folder
from ..training.config import RunConfig, check_fraction
from ..training.schedule import clip_warmup_epochs
from .presets import COMMON, LINEAR_PROBE, resolve_recipe

# options that make a resumed run another run (refused), and ones that only change its course
RESUME_MUST_MATCH = ("model", "finetune", "depths", "dims", "stem_stride", "in_chans",
                     "v1_block", "model_kwargs", "img_size", "data", "effective_batch", "seed",
                     "linear_probe", "train_subset", "val_subset", "model_ema", "recipe")
RESUME_MAY_CHANGE = ("epochs", "lr", "blr", "min_lr", "warmup_epochs", "warmup_steps",
                     "weight_decay", "layer_decay", "drop_path", "smoothing", "mixup", "cutmix",
                     "reprob", "auto_augment", "clip_grad", "amp", "max_steps_per_epoch")


@dataclass
class FinetuneConfig(RunConfig):
    """One fine-tuning run. ``None`` means: take the value from the preset (see ``resolve``)."""
    output: str = "runs/finetune"
    workers: int = 0
    finetune: str | None = None            # checkpoint to start from (any layout)
    recipe: str = "auto"                   # a preset name; resolved: the preset used
    linear_probe: bool = False
    epochs: int | None = None
    lr: float | None = None                # absolute lr; default blr * effective batch / 256
    blr: float | None = None
    min_lr: float | None = None
    warmup_epochs: float | None = None
    weight_decay: float | None = None
    layer_decay: float | None = None
    layer_decay_mode: str | None = None
    smoothing: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    cutmix_minmax: Sequence[float] | None = None
    mixup_prob: float | None = None
    mixup_switch_prob: float | None = None
    mixup_mode: str | None = None
    reprob: float | None = None
    remode: str | None = None
    recount: int | None = None
    auto_augment: str | None = None        # "none" disables RandAugment
    color_jitter: float | None = None      # used when RandAugment is off, as in timm
    train_interpolation: str | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    crop_pct: float | None = None          # evaluation crop ratio (None: by image size)
    betas: Sequence[float] | None = None
    eps: float | None = None
    model_ema: bool | None = None
    model_ema_decay: float | None = None
    model_ema_warmup: bool = False         # timm's decay warmup, for short runs
    clip_grad: float | None = None
    head_init_std: float = 2e-5
    max_steps_per_epoch: int | None = None  # cap the batches per epoch (tests, demos)
    train_subset: int | None = None        # train on N random training images only
    val_subset: int | None = None          # evaluate on N random validation images only

    def __post_init__(self):
        if self.model is None and not self.finetune:
            self.model = "convnextv2_atto"

    def replay_options(self) -> dict:
        """As recorded for ``--config``: a resolved ``auto_augment`` of None means "off", which
        read back would mean "the preset's", so it is written as "none"."""
        values = super().replay_options()
        if values.get("auto_augment") is None:
            values["auto_augment"] = "none"
        return values


def default_img_size(data: str) -> int:
    """32 px for the built-in and IDX (28 px) images, else ImageNet's 224."""
    return 32 if str(data) == "builtin" or is_idx_folder(Path(data)) else 224


def resolve(cfg: FinetuneConfig, depths=None, dims=None) -> FinetuneConfig:
    """``cfg`` with every ``None`` hyper-parameter filled: the preset's values (the linear
    probe's over them with ``linear_probe``), then every value ``cfg`` sets. ``recipe`` becomes
    the preset's name (never "auto"). ``depths``/``dims``: the architecture trained, when it
    is not a plain variant (``auto`` picks the nearest preset). A preset's warmup is capped at a
    quarter of a short run; ``auto_augment`` "none" becomes None (off)."""
    values = resolve_recipe(cfg.model if depths is None else None, cfg.recipe, depths, dims)
    if cfg.linear_probe:
        values.update(LINEAR_PROBE)
    given = {k: getattr(cfg, k) for k in values if k != "recipe" and getattr(cfg, k) is not None}
    values.update(given)
    if cfg.warmup_epochs is None:  # a preset's 20-40 warmup epochs would swallow a short run
        values["warmup_epochs"] = clip_warmup_epochs(values["warmup_epochs"], values["epochs"])
    if values["auto_augment"] in ("none", "None", ""):
        values["auto_augment"] = None
    return dataclasses.replace(cfg, **values, warmup_steps=cfg.warmup_steps or None,
                               img_size=cfg.img_size or default_img_size(cfg.data))


def hyperparameters(run: FinetuneConfig) -> dict:
    """The resolved values of every preset field and the preset's name (``config.json``)."""
    return {k: getattr(run, k) for k in (*COMMON, "recipe", "warmup_steps")}


def saved_args(cfg: FinetuneConfig, run: FinetuneConfig) -> dict:
    """What the run states record as the run's options (and a resume compares): the options as
    given, ``None`` for "the preset's", with the preset actually used."""
    return dict(dataclasses.asdict(cfg), recipe=run.recipe)


def check_hyperparameters(run: FinetuneConfig) -> None:
    """Refuse values of the resolved config that cannot train, naming the flag and the
    accepted range."""
    def need(ok, flag, accepted, value):
        if not ok:
            raise ValueError(f"--{flag} must be {accepted}, got {value}")

    need(run.epochs >= 1, "epochs", ">= 1", run.epochs)
    need(run.batch_size >= 1, "batch-size", ">= 1", run.batch_size)
    for name in ("lr", "blr", "min_lr", "weight_decay", "warmup_epochs", "mixup", "cutmix",
                 "clip_grad", "color_jitter", "warmup_steps"):
        value = getattr(run, name)
        need(value is None or value >= 0, name.replace("_", "-"), ">= 0", value)
    check_fraction(run.smoothing, "smoothing", closed=False,
                   why=" (1 would make every target uniform)")
    check_fraction(run.drop_path, "drop-path", closed=False, why=" (1 drops every block)")
    for name in ("reprob", "mixup_prob", "mixup_switch_prob", "model_ema_decay"):
        check_fraction(getattr(run, name), name.replace("_", "-"))
    need(0 < run.layer_decay <= 1, "layer-decay", "in (0, 1]", run.layer_decay)
    need(run.layer_decay_mode in ("single", "group"), "layer-decay-mode", "single or group",
         run.layer_decay_mode)
    need(run.mixup_mode in ("batch", "pair", "elem"), "mixup-mode", "batch, pair or elem",
         run.mixup_mode)
    need(run.remode in ("const", "rand", "pixel"), "remode", "const, rand or pixel", run.remode)
    need(run.crop_pct is None or 0 < run.crop_pct <= 1, "crop-pct", "in (0, 1]", run.crop_pct)
    need(run.recount >= 1, "recount", ">= 1", run.recount)
    need(run.eps > 0, "eps", "> 0", run.eps)
    for name in ("train_subset", "val_subset", "max_steps_per_epoch"):
        value = getattr(run, name)
        need(value is None or value >= 1, name.replace("_", "-"), ">= 1", value)
    lo, hi = run.crop_scale
    need(0 < lo <= hi <= 1, "crop-scale", "MIN MAX with 0 < MIN <= MAX <= 1", f"{lo} {hi}")
    if run.fsdp and run.linear_probe:
        raise ValueError("--fsdp with --linear-probe: a probe trains one Linear layer; "
                         "drop --fsdp (DDP is used under torchrun)")
    if run.fsdp and run.model_ema:
        raise ValueError("--fsdp with model EMA: the EMA copy would not be sharded; add "
                         "--no-model-ema")
