"""Supervised fine-tuning of ConvNeXt V2 (the official recipe, docs/recipes.md) and linear probing.

``finetune(FinetuneConfig(...))`` runs the whole job and returns a summary; ``convnextv2
finetune`` is its command line. Every recipe value comes from a preset, one per model size
(``auto``: the preset of the variant nearest to the model being trained, see
``auto_preset``), unless the config sets it. The loop, resume, checkpoints and step logs are
the training engine's (``training.loop.Trainer``); this module builds the data, the model and
its optimizer, says what a step computes, and validates and saves after each epoch.

Written under ``output``: ``config.json`` (the options, the preset used and every resolved
value), ``metrics.jsonl`` (one line per epoch), ``steps.jsonl`` (one line per optimizer step),
``accuracy.png`` and ``loss.png``, ``best.safetensors`` (the model weights with the best
validation top-1) and ``best_ema.safetensors`` (the EMA weights with the best top-1, when EMA
is on), ``last.safetensors`` / ``last_ema.safetensors`` (after the last epoch), run states
``checkpoint-<step>.pt`` for ``--resume`` and ``summary.json``. The safetensors files are
native checkpoints carrying the class names, image size and preset in their metadata.

Reproducibility, as in pretraining: the sample order is a function of (seed, epoch), each
image's augmentation of (seed, epoch, sample index) (``KeyedAugmentDataset``), and mixup/cutmix
draws of (seed, optimizer step, micro-batch) (``keyed_mixup`` reseeds the global RNGs timm's
``Mixup`` reads for the call and restores them after). A run resumed mid-epoch therefore
repeats the uninterrupted run's per-step losses (bit for bit with ``deterministic`` on CPU).
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .. import training as T
from ..checkpoint import infer_config, load_checkpoint, save_checkpoint
from ..data import build_dataset, count_skipped, eval_transform, is_idx_folder, train_transform
from ..models.model import ConvNeXtV2
from ..models.registry import model_config
from ..models.variants import VARIANTS, resolve_name
from ..training import fsdp, sample_key
from ..training.dist_eval import evaluate, evaluate_distributed, sharded_loader
from ..training.runstate import plain
from ..training.layer_decay import param_groups_layer_decay
from ..training.config import RunConfig, check_fraction
from ..training.schedule import clip_warmup_epochs

# values every preset shares (the official fine-tuning script's defaults); a preset overrides
# some. effective_batch is the official runs' (informational: lr = blr * the actual batch / 256)
COMMON = dict(
    epochs=100, batch_size=32, effective_batch=1024, blr=5e-4, min_lr=1e-6, warmup_epochs=20,
    weight_decay=0.05, layer_decay=0.9, layer_decay_mode="single", drop_path=0.1,
    smoothing=0.1, mixup=0.8, cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0,
    mixup_switch_prob=0.5, mixup_mode="batch", reprob=0.25, remode="pixel", recount=1,
    auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, train_interpolation="bicubic",
    crop_pct=None, model_ema=True, model_ema_decay=0.9999, betas=(0.9, 0.999), eps=1e-8,
    clip_grad=None,
)

# the paper's appendix (Tables 9-11), one preset per size; docs/recipes.md has the table.
# base and large use the official TRAINING.md base lr 6.25e-4 (the paper's table says 6.25e-3)
_SMALL = dict(epochs=600, blr=2e-4, layer_decay=0.9, warmup_epochs=0, smoothing=0.2)
PRESETS = {
    "atto": dict(_SMALL, weight_decay=0.3, mixup=0.0, cutmix=0.0, drop_path=0.1),
    "femto": dict(_SMALL, weight_decay=0.05, mixup=0.3, cutmix=0.3, drop_path=0.0),
    "pico": dict(_SMALL, weight_decay=0.3, mixup=0.3, cutmix=0.3, drop_path=0.0),
    "nano": dict(_SMALL, weight_decay=0.3, mixup=0.5, cutmix=0.5, drop_path=0.1),
    "tiny": dict(epochs=300, blr=8e-4, layer_decay=0.9, drop_path=0.2, warmup_epochs=40),
    "base": dict(epochs=100, blr=6.25e-4, layer_decay=0.6, layer_decay_mode="group",
                 drop_path=0.1, warmup_epochs=20),
    "large": dict(epochs=100, blr=6.25e-4, layer_decay=0.6, layer_decay_mode="group",
                  drop_path=0.2, warmup_epochs=20),
    "huge": dict(epochs=50, blr=1.25e-3, layer_decay=0.75, layer_decay_mode="group",
                 drop_path=0.3, warmup_epochs=10),
}
RECIPES = ("auto", *PRESETS)

# --linear-probe: MAE-style probing values (90 epochs, 10 warmup, no regularisation); AdamW
# with blr 1e-3 here instead of MAE's LARS with blr 0.1
LINEAR_PROBE = dict(epochs=90, blr=1e-3, weight_decay=0.0, layer_decay=1.0, drop_path=0.0,
                    smoothing=0.0, mixup=0.0, cutmix=0.0, cutmix_minmax=None, reprob=0.0,
                    auto_augment=None, color_jitter=None, model_ema=False, warmup_epochs=10)
# options that make a resumed run another run (refused), and ones that only change its course
RESUME_MUST_MATCH = ("model", "finetune", "depths", "dims", "stem_stride", "in_chans",
                     "v1_block", "model_kwargs", "img_size", "data", "effective_batch", "seed",
                     "linear_probe", "train_subset", "val_subset", "model_ema", "recipe")
RESUME_MAY_CHANGE = ("epochs", "lr", "blr", "min_lr", "warmup_epochs", "weight_decay",
                     "layer_decay", "drop_path", "smoothing", "mixup", "cutmix", "reprob",
                     "auto_augment", "clip_grad", "amp", "max_steps_per_epoch")


def auto_preset(model_name: str | None = None, depths=None, dims=None) -> str:
    """The one rule for ``--recipe auto``: the preset of the named variant nearest to the
    architecture trained, first by total block count, then by the first stage's width. A
    plain variant gets its own preset; a reshaped or checkpoint-inferred one the closest."""
    if depths is None or dims is None:
        base = VARIANTS[resolve_name(model_name or "convnextv2_atto")]
        depths, dims = depths or base["depths"], dims or base["dims"]
    name = min(VARIANTS, key=lambda v: (abs(sum(VARIANTS[v]["depths"]) - sum(depths)),
                                        abs(VARIANTS[v]["dims"][0] - dims[0])))
    return name.split("_", 1)[1]


def resolve_recipe(model_name: str | None, recipe: str = "auto", depths=None,
                   dims=None) -> dict:
    """COMMON updated with the preset (``recipe`` or the one ``auto`` picks); adds ``recipe``,
    the name of the preset used (never "auto")."""
    if recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    name = auto_preset(model_name, depths, dims) if recipe == "auto" else recipe
    values = dict(COMMON)
    values.update(PRESETS[name])
    values["recipe"] = name
    return values


@dataclass
class FinetuneConfig(RunConfig):
    """One fine-tuning run. ``None`` means: take the value from the preset."""
    output: str = "runs/finetune"
    workers: int = 0
    keep_last: int = 2
    finetune: str | None = None            # checkpoint to start from (any layout)
    recipe: str = "auto"
    linear_probe: bool = False
    accum_iter: int | None = None          # older name of accum_steps, still accepted
    epochs: int | None = None
    lr: float | None = None                # absolute lr; default blr * effective batch / 256
    blr: float | None = None
    min_lr: float | None = None
    warmup_epochs: float | None = None
    warmup_steps: int | None = None        # > 0: overrides warmup_epochs
    weight_decay: float | None = None
    layer_decay: float | None = None
    layer_decay_mode: str | None = None
    drop_path: float | None = None
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
        if self.accum_iter is not None:
            self.accum_steps, self.accum_iter = self.accum_iter, None


def resolve(cfg: FinetuneConfig, depths=None, dims=None) -> dict:
    """The effective hyper-parameters: preset values overridden by every non-None config
    field. ``depths``/``dims``: the architecture trained, when it is not a plain variant."""
    model = cfg.model if depths is None else None
    values = resolve_recipe(model, cfg.recipe, depths, dims)
    if cfg.linear_probe:
        values.update(LINEAR_PROBE)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in values and f.name != "recipe" and v is not None:
            values[f.name] = v
    if cfg.warmup_epochs is None:  # a preset's 20-40 warmup epochs would swallow a short run
        values["warmup_epochs"] = clip_warmup_epochs(values["warmup_epochs"], values["epochs"])
    if values.get("auto_augment") in ("none", "None", ""):
        values["auto_augment"] = None
    values["warmup_steps"] = cfg.warmup_steps if cfg.warmup_steps else None
    return values


def check_hyperparameters(hp: dict, cfg: FinetuneConfig) -> None:
    """Refuse values that cannot train, naming the flag and the accepted range."""
    def need(ok, flag, accepted, value):
        if not ok:
            raise ValueError(f"--{flag} must be {accepted}, got {value}")

    need(hp["epochs"] >= 1, "epochs", ">= 1", hp["epochs"])
    need(hp["batch_size"] >= 1, "batch-size", ">= 1", hp["batch_size"])
    for name in ("lr", "blr", "min_lr", "weight_decay", "warmup_epochs", "mixup", "cutmix",
                 "clip_grad", "color_jitter", "warmup_steps"):
        value = hp.get(name, getattr(cfg, name, None))
        need(value is None or value >= 0, name.replace("_", "-"), ">= 0", value)
    check_fraction(hp["smoothing"], "smoothing", closed=False,
                   why=" (1 would make every target uniform)")
    check_fraction(hp["drop_path"], "drop-path", closed=False, why=" (1 drops every block)")
    for name in ("reprob", "mixup_prob", "mixup_switch_prob", "model_ema_decay"):
        check_fraction(hp[name], name.replace("_", "-"))
    need(0 < hp["layer_decay"] <= 1, "layer-decay", "in (0, 1]", hp["layer_decay"])
    need(hp["layer_decay_mode"] in ("single", "group"), "layer-decay-mode", "single or group",
         hp["layer_decay_mode"])
    need(hp["mixup_mode"] in ("batch", "pair", "elem"), "mixup-mode", "batch, pair or elem",
         hp["mixup_mode"])
    need(hp["remode"] in ("const", "rand", "pixel"), "remode", "const, rand or pixel",
         hp["remode"])
    need(hp["crop_pct"] is None or 0 < hp["crop_pct"] <= 1, "crop-pct", "in (0, 1]",
         hp["crop_pct"])
    need(hp["recount"] >= 1, "recount", ">= 1", hp["recount"])
    need(hp["eps"] > 0, "eps", "> 0", hp["eps"])
    for name in ("train_subset", "val_subset", "max_steps_per_epoch"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, name.replace("_", "-"), ">= 1", value)
    lo, hi = cfg.crop_scale
    need(0 < lo <= hi <= 1, "crop-scale", "MIN MAX with 0 < MIN <= MAX <= 1", f"{lo} {hi}")
    if cfg.fsdp and cfg.linear_probe:
        raise ValueError("--fsdp with --linear-probe: a probe trains one Linear layer; "
                         "drop --fsdp (DDP is used under torchrun)")
    if cfg.fsdp and hp["model_ema"]:
        raise ValueError("--fsdp with model EMA: the EMA copy would not be sharded; add "
                         "--no-model-ema")


def reinit_head(model: nn.Module, std: float = 2e-5) -> None:
    """Fresh classifier for a new label set: truncated normal ``std`` weight, zero bias."""
    fc = model.head.fc
    if isinstance(fc, nn.Linear):
        with torch.no_grad():
            nn.init.trunc_normal_(fc.weight, std=std, a=-2.0, b=2.0)
            nn.init.zeros_(fc.bias)


def finetune_architecture(model_name: str | None, checkpoint: str | None = None,
                          **model_kwargs) -> dict:
    """Constructor arguments: explicit ``model_kwargs`` first, then the variant ``model_name``
    for depths and dims, then what the checkpoint stores or implies (its stem stride, input
    channels, GRN / layer scale; and depths and dims when no variant is named). A variant that
    does not match the checkpoint fails when loading, with the mis-shaped keys named."""
    config = dict(model_config(model_name)) if model_name else {}
    if checkpoint:
        stored = _checkpoint_config(checkpoint)
        skip = {"num_classes", "drop_path_rate", "head_init_scale"}
        if model_name:
            skip |= {"depths", "dims"}
        config.update({k: v for k, v in stored.items() if k not in skip})
    config.update({k: v for k, v in model_kwargs.items() if v is not None})
    if "depths" not in config:
        raise ValueError("give --model (a variant name) or a checkpoint that stores its config")
    return config


def build_finetune_model(model_name: str | None, num_classes: int, checkpoint: str | None = None,
                         drop_path: float = 0.0, head_init_std: float = 2e-5,
                         **model_kwargs) -> tuple[nn.Module, dict]:
    """The model to fine-tune: architecture from ``finetune_architecture``, weights from
    ``checkpoint`` in any layout. The checkpoint's head is dropped and re-initialised (std
    ``head_init_std``) since fine-tuning starts a new classifier; returns (model, load report)."""
    config = finetune_architecture(model_name, checkpoint, **model_kwargs)
    config.update(num_classes=num_classes, drop_path_rate=drop_path, head_init_scale=0.001)
    model = ConvNeXtV2(**config)
    report: dict = {}
    if checkpoint:
        report = load_checkpoint(model, checkpoint, strict=True, drop_head=True)
        reinit_head(model, head_init_std)
    return model, report


def _checkpoint_config(path: str) -> dict:
    """The architecture a checkpoint stores (native files) or implies by its tensor shapes."""
    return dict(infer_config(path))


class LinearProbe:
    """Freeze everything, put a non-affine BatchNorm1d before a fresh Linear head (MAE-style
    probing: the BN only standardises the pooled features), and fold the BN back into one
    Linear for saving, so the saved model is a plain ConvNeXtV2."""

    def __init__(self, model: nn.Module, num_classes: int, std: float = 0.01):
        for p in model.parameters():
            p.requires_grad_(False)
        dim = model.num_features
        fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(fc.weight, std=std, a=-2.0, b=2.0)
        nn.init.zeros_(fc.bias)
        model.head.fc = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc)
        self.model = model

    def train_mode(self) -> None:
        self.model.eval()           # frozen encoder: no drop path, fixed norms
        self.model.head.fc.train()  # the BN statistics do update

    @staticmethod
    def folded(model: nn.Module) -> nn.Module:
        """A copy with the BN folded into the Linear (identical outputs in eval mode)."""
        import copy
        model = copy.deepcopy(model)
        fc = model.head.fc
        if isinstance(fc, nn.Sequential):
            bn, lin = fc[0], fc[1]
            scale = (bn.running_var + bn.eps).rsqrt()
            folded = nn.Linear(lin.in_features, lin.out_features)
            with torch.no_grad():
                folded.weight.copy_(lin.weight * scale)
                folded.bias.copy_(lin.bias - folded.weight @ bn.running_mean)
            model.head.fc = folded
        return model


@contextmanager
def keyed_rng(key: int):
    """Run the body with the global torch (CPU), numpy and python RNGs seeded by ``key``, then
    put the previous states back, so the caller's random streams are untouched."""
    import random

    import numpy as np
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), \
        random.getstate()
    try:
        torch.default_generator.manual_seed(key)
        np.random.seed(key % 2 ** 32)
        random.seed(key)
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


def keyed_mixup(mixup_fn, x, y, seed: int, step: int, micro: int = 0):
    """timm's ``Mixup`` with its draws (lambda, mixup-or-cutmix, box) keyed by (seed,
    optimizer step, micro-batch): the global RNGs it reads are reseeded from that key for the
    call and restored afterwards. Every rank draws the same lambda for a step, as one process
    holding the whole global batch would."""
    with keyed_rng(sample_key(seed, step, micro, salt="mixup")):
        return mixup_fn(x, y)


def _criterion(hp: dict, mixup_active: bool):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_active:
        return SoftTargetCrossEntropy()
    if hp["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=hp["smoothing"])
    return nn.CrossEntropyLoss()


def _default_img_size(data: str) -> int:
    return 32 if str(data) == "builtin" or is_idx_folder(Path(data)) else 224


@dataclass
class Plan:
    """Everything decided before the run starts (and before anything is written)."""
    arch: dict
    hp: dict
    img_size: int
    in_chans: int
    train_tf: object
    eval_tf: object


def plan(cfg: FinetuneConfig) -> Plan:
    """Resolve the architecture, the preset and the transforms, and check every value, without
    writing anything: a refused run leaves ``--output`` as it was."""
    arch = finetune_architecture(cfg.model, cfg.finetune, **cfg.architecture())
    named = cfg.model and not any(k in cfg.architecture() for k in ("depths", "dims"))
    hp = resolve(cfg, None if named else arch["depths"], None if named else arch["dims"])
    check_hyperparameters(hp, cfg)
    img_size = cfg.img_size or _default_img_size(cfg.data)
    in_chans = arch.get("in_chans", 3)
    try:
        train_tf = train_transform(
            img_size, in_chans, auto_augment=hp["auto_augment"], reprob=hp["reprob"],
            remode=hp["remode"], recount=hp["recount"], scale=tuple(cfg.crop_scale),
            color_jitter=hp["color_jitter"], interpolation=hp["train_interpolation"])
    except Exception as e:  # timm's parsers raise assorted errors for a bad policy string
        raise ValueError(f"--aa {hp['auto_augment']!r} / --train-interpolation "
                         f"{hp['train_interpolation']!r}: not accepted by timm ({e}); use a "
                         f"RandAugment policy such as rand-m9-mstd0.5-inc1, or none") from None
    return Plan(arch, hp, img_size, in_chans, train_tf,
                eval_transform(img_size, in_chans, crop_pct=hp["crop_pct"]))


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one fine-tuning job (see the module docstring for what it writes).

    Launched by ``torchrun`` it trains data-parallel (each rank evaluates its share of the
    validation set, every image counted once; rank 0 writes), or sharded with ``fsdp``. A run
    state is saved after every epoch and every ``save_every_steps`` optimizer steps;
    ``resume="auto"`` continues after the newest intact one.
    """
    T.check_run_config(cfg)  # the shared options first, then the recipe's
    p = plan(cfg)
    with T.run_session(cfg) as (info, out):
        return _finetune(cfg, p, info, out)


def _finetune(cfg: FinetuneConfig, p: Plan, info: T.DistInfo, out: Path) -> dict:
    from timm.utils import ModelEmaV3

    hp = p.hp
    data = build_data(cfg, p, info)
    model, load_report = build_finetune_model(
        cfg.model, data.num_classes, cfg.finetune, drop_path=hp["drop_path"],
        head_init_std=cfg.head_init_std, **p.arch)
    probe = LinearProbe(model, data.num_classes) if cfg.linear_probe else None
    model.to(info.device)
    if cfg.fsdp:  # before the optimizer: sharding replaces the parameters
        fsdp.shard(model, info)
    groups = param_groups_layer_decay(model, hp["weight_decay"], hp["layer_decay"],
                                      hp["layer_decay_mode"])
    eff = T.effective_batch(hp["batch_size"], cfg.accum_steps, info.world_size)
    base_lr = cfg.lr if cfg.lr is not None else T.scaled_lr(hp["blr"], eff)
    optimizer = torch.optim.AdamW([{k: g[k] for k in ("params", "weight_decay", "lr_scale")}
                                   for g in groups], lr=base_lr, betas=tuple(hp["betas"]),
                                  eps=hp["eps"])
    ema = (ModelEmaV3(model, decay=hp["model_ema_decay"], use_warmup=cfg.model_ema_warmup)
           if hp["model_ema"] else None)
    steps_per_epoch = data.batches_per_epoch // cfg.accum_steps
    schedule = T.WarmupCosineSchedule(optimizer, base_lr=base_lr, epochs=hp["epochs"],
                                      steps_per_epoch=steps_per_epoch,
                                      warmup_epochs=hp["warmup_epochs"],
                                      warmup_steps=hp["warmup_steps"], min_lr=hp["min_lr"])
    epochs = _Epochs(cfg, p, info, out, data, model, ema)
    args = dict(dataclasses.asdict(cfg), recipe=hp["recipe"], effective_batch=eff)
    trainer = T.Trainer(
        model=model, loader=data.loader, optimizer=optimizer, schedule=schedule, cfg=cfg,
        info=info, out=out, args=args, batches_per_epoch=steps_per_epoch * cfg.accum_steps,
        total_steps=hp["epochs"] * steps_per_epoch, images_per_step=eff, ema=ema,
        clip_grad=hp["clip_grad"], desc="finetune", extra_state=epochs.state_to_save,
        restore_extra=epochs.restore, train_mode=probe.train_mode if probe else None)
    trainer.resume(RESUME_MUST_MATCH, RESUME_MAY_CHANGE)
    epochs.trainer = trainer
    if info.is_main:
        _write_json(out / "config.json", dict(
            config=args, hyperparameters=hp, base_lr=base_lr, effective_batch=eff,
            world_size=info.world_size, model_config=model.config, classes=data.classes,
            load_report=load_report, skipped_images=data.skipped))
        if data.skipped:
            trainer.say(f"note: skipped {data.skipped} unreadable image(s) in {cfg.data} "
                        f"(--strict-data makes them fatal)")
    criterion = _criterion(hp, data.mixup_fn is not None)

    def forward(train_model, batch, key):
        x, y = batch
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if data.mixup_fn is not None:
            x, y = keyed_mixup(data.mixup_fn, x, y, cfg.seed, key.step, key.micro)
        return criterion(train_model(x).float(), y), len(x)

    t_start = epochs.t_epoch = time.time()
    with trainer.open_log("steps.jsonl", "metrics.jsonl") as log:
        epochs.log = log
        for epoch in trainer.epochs(hp["epochs"]):
            if not trainer.train_one_epoch(forward):
                break
            epochs.end(epoch)
            trainer.save_state()
    return epochs.summary(base_lr, time.time() - t_start, probe is not None)


@dataclass
class FinetuneData:
    loader: object           # training batches (keyed order and augmentation)
    val_loader: object
    classes: list
    skipped: int
    batches_per_epoch: int   # micro-batches, a multiple of the accumulation
    mixup_fn: object | None
    datasets: tuple = ()     # train and val, for the skip count at the end

    def skipped_now(self) -> int:
        """Unreadable images skipped so far, counted across loader workers (files that fail
        only when decoded are found during training, not when the folder is listed)."""
        return max(self.skipped, count_skipped(*self.datasets))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _subset(ds, n: int | None, seed: int):
    """``n`` images of ``ds`` drawn by ``seed`` (in dataset order), or ``ds`` itself."""
    if not n:
        return ds
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, keep.sort().values.tolist())


def build_data(cfg: FinetuneConfig, p: Plan, info: T.DistInfo) -> FinetuneData:
    """The training and validation loaders and the mixup/cutmix function of the run."""
    from timm.data import Mixup

    hp, batch = p.hp, p.hp["batch_size"]
    train_ds = build_dataset(cfg.data, "train", p.train_tf, strict=cfg.strict_data,
                             labelled=True)
    val_ds = build_dataset(cfg.data, "val", p.eval_tf, strict=cfg.strict_data, labelled=True)
    classes = list(train_ds.classes)
    if val_ds.classes != classes:
        raise ValueError(f"{cfg.data}: the train and val splits have different classes "
                         f"({len(classes)} vs {len(val_ds.classes)})")
    skipped = train_ds.num_skipped + val_ds.num_skipped
    train_ds = _subset(train_ds, cfg.train_subset, cfg.seed)
    val_ds = _subset(val_ds, cfg.val_subset, cfg.seed + 1)
    mixup_active = hp["mixup"] > 0 or hp["cutmix"] > 0 or hp["cutmix_minmax"] is not None
    if mixup_active and len(train_ds) < batch * info.world_size:
        raise ValueError(f"mixup/cutmix need full batches: {len(train_ds)} training images < "
                         f"--batch-size {batch} x {info.world_size} processes")
    keyed = T.KeyedAugmentDataset(train_ds, cfg.seed)
    sampler = T.ResumableSampler(T.build_sampler(keyed, info, shuffle=True, seed=cfg.seed))
    loader = DataLoader(keyed, batch_size=batch, sampler=sampler, drop_last=mixup_active,
                        num_workers=cfg.workers, worker_init_fn=T.worker_init,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        persistent_workers=False)  # workers must see each set_epoch
    # each rank scores an unpadded share of the validation set; evaluate() sums over ranks.
    # Sharded (FSDP) weights are gathered into one copy that rank 0 scores on the whole set.
    val_batch = max(2 * batch, 64)
    val_loader = sharded_loader(val_ds, info, batch_size=val_batch, num_workers=cfg.workers)
    if cfg.fsdp and info.distributed:
        val_loader = DataLoader(val_ds, batch_size=val_batch, shuffle=False,
                                num_workers=cfg.workers)
    mixup_fn = (Mixup(mixup_alpha=hp["mixup"], cutmix_alpha=hp["cutmix"],
                      cutmix_minmax=hp["cutmix_minmax"], prob=hp["mixup_prob"],
                      switch_prob=hp["mixup_switch_prob"], mode=hp["mixup_mode"],
                      label_smoothing=hp["smoothing"], num_classes=len(classes))
                if mixup_active else None)
    batches = len(loader)
    if cfg.max_steps_per_epoch:
        batches = min(batches, cfg.max_steps_per_epoch * cfg.accum_steps)
    if batches < cfg.accum_steps:
        raise ValueError(f"too few training batches ({batches}) for --accum-steps "
                         f"{cfg.accum_steps}: {len(train_ds)} images, batch {batch}")
    batches -= batches % cfg.accum_steps  # no half-accumulated step at an epoch's end
    return FinetuneData(loader, val_loader, classes, skipped, batches, mixup_fn,
                        (train_ds, val_ds))


class _Epochs:
    """What happens after each epoch: validation of the model (and EMA), the best / last
    weight files, the epoch record and curves; and the part of it a resume must restore."""

    def __init__(self, cfg: FinetuneConfig, p: Plan, info, out: Path, data: FinetuneData,
                 model: nn.Module, ema):
        self.cfg, self.hp, self.info, self.out, self.data = cfg, p.hp, info, out, data
        self.model, self.ema = model, ema
        self.meta = dict(class_names=data.classes, img_size=p.img_size, in_chans=p.in_chans,
                         recipe=p.hp["recipe"], data=str(cfg.data), linear_probe=cfg.linear_probe)
        self.state = dict(best_top1=-1.0, best_source=None, best_epoch=None,
                          best_model_top1=-1.0, best_ema_top1=-1.0, history=[])
        self.trainer: T.Trainer | None = None
        self.log: T.RunLog | None = None
        self.t_epoch = time.time()

    def state_to_save(self) -> dict:
        return dict(finetune_state=json.dumps(self.state))

    def restore(self, extra: dict) -> None:
        saved = json.loads(extra["finetune_state"])
        saved.setdefault("best_model_top1", saved.get("best_top1", -1.0))  # older run states
        saved.setdefault("best_ema_top1", -1.0)
        self.state = saved

    def _scores(self) -> tuple[dict, nn.Module]:
        """Validation of the model's weights (gathered first when sharded) and those weights."""
        cfg, info, amp = self.cfg, self.info, self.cfg.amp or "none"
        if cfg.fsdp and info.distributed:  # one gathered copy, scored and saved by rank 0
            config = dict(self.model.config)
            gathered = fsdp.unsharded_copy(self.model, lambda: ConvNeXtV2(**config), info.device,
                                           info.is_main)
            scores = T.broadcast_object(
                evaluate(gathered, self.data.val_loader, self.data.num_classes, info.device, amp)
                if info.is_main else None)
            return scores, gathered
        return evaluate_distributed(self.model, self.data.val_loader, self.data.num_classes,
                                    info.device, amp), self.model

    def end(self, epoch: int) -> None:
        """Validate after epoch ``epoch`` (1-based), save weights, log and plot."""
        trainer, info, amp = self.trainer, self.info, self.cfg.amp or "none"
        train_time = time.time() - self.t_epoch
        record = dict(step=trainer.pos.global_step, epoch=epoch,
                      train_loss=trainer.loss_sum / max(trainer.seen, 1), lr=trainer.lr,
                      img_per_s=trainer.seen * info.world_size / max(train_time, 1e-9),
                      skipped_images=self.data.skipped_now())
        scores, weights = self._scores()
        record.update(val_loss=scores["loss"], val_top1=scores["top1"], val_top5=scores["top5"])
        files = {"model": (scores["top1"], weights, "best.safetensors", "last.safetensors")}
        if self.ema is not None:
            ema_scores = evaluate_distributed(self.ema.module, self.data.val_loader,
                                              self.data.num_classes, info.device, amp)
            record.update(ema_val_loss=ema_scores["loss"], ema_val_top1=ema_scores["top1"],
                          ema_val_top5=ema_scores["top5"])
            files["ema"] = (ema_scores["top1"], self.ema.module, "best_ema.safetensors",
                            "last_ema.safetensors")
        record["epoch_time_s"] = time.time() - self.t_epoch
        self.state["history"].append(record)
        for source, (top1, module, best_name, last_name) in files.items():
            improved = top1 > self.state[f"best_{source}_top1"]
            if improved:
                self.state[f"best_{source}_top1"] = top1
            if top1 > self.state["best_top1"]:
                self.state.update(best_top1=top1, best_source=source, best_epoch=epoch)
            if info.is_main:
                meta = dict(self.meta, epoch=epoch, weights=source, top1=top1)
                if improved:
                    _save_weights(module, self.out / best_name, meta)
                _save_weights(module, self.out / last_name, meta)
        if info.is_main:
            self.log.epoch(record)
            self._plot_and_say(record)
        self.t_epoch = time.time()

    def _plot_and_say(self, record: dict) -> None:
        history = self.state["history"]
        T.plot_curves(history, self.out / "accuracy.png", keys=("val_top1", "ema_val_top1"),
                      x="epoch", title="validation top-1 (%)")
        T.plot_curves(history, self.out / "loss.png",
                      keys=("train_loss", "val_loss", "ema_val_loss"), x="epoch", title="loss")
        if self.cfg.progress:
            msg = (f"epoch {record['epoch']}/{self.hp['epochs']}: train loss "
                   f"{record['train_loss']:.4f}, val top-1 {record['val_top1']:.2f}%")
            if "ema_val_top1" in record:
                msg += f", EMA top-1 {record['ema_val_top1']:.2f}%"
            self.trainer.say(msg)

    def summary(self, base_lr: float, train_time: float, probe: bool) -> dict:
        """summary.json (rank 0) and the returned dict (with the trained modules)."""
        cfg, info, out, state = self.cfg, self.info, self.out, self.state
        best_file = "best_ema.safetensors" if state["best_source"] == "ema" else \
            "best.safetensors"
        summary = dict(best_top1=state["best_top1"], best_source=state["best_source"],
                       best_epoch=state["best_epoch"], best_model_top1=state["best_model_top1"],
                       best_ema_top1=state["best_ema_top1"] if self.ema is not None else None,
                       epochs=self.hp["epochs"],
                       final=state["history"][-1] if state["history"] else None,
                       train_time_s=train_time, classes=self.data.classes, output=str(out),
                       skipped_images=self.data.skipped_now(), base_lr=base_lr,
                       recipe=self.hp["recipe"], best=str(out / best_file),
                       last=str(out / "last.safetensors"), rank=info.rank,
                       global_step=self.trainer.pos.global_step)
        if info.is_main:
            _write_json(out / "summary.json", summary)
        model = self.model
        if cfg.fsdp and info.distributed:
            config = dict(model.config)
            model = fsdp.unsharded_copy(model, lambda: ConvNeXtV2(**config), info.device,
                                        info.is_main)
        summary["model"] = LinearProbe.folded(model) if probe and model is not None else model
        summary["ema"] = self.ema.module if self.ema is not None else None
        summary["history"] = state["history"]
        return summary


def _save_weights(model: nn.Module, path: Path, metadata: dict) -> None:
    """Native safetensors with ``metadata``; a linear-probe head is folded to a Linear first."""
    if isinstance(getattr(model.head, "fc", None), nn.Sequential):
        model = LinearProbe.folded(model)
    save_checkpoint(model, path, layout="native", metadata=_string_metadata(metadata))


def _string_metadata(metadata: dict) -> dict[str, str]:
    """safetensors metadata holds strings: lists and numbers are stored as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(plain(obj), indent=2))
