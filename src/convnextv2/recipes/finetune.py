"""Supervised fine-tuning of ConvNeXt V2 (official recipe, SPEC section 3) and linear probing.

``finetune(FinetuneConfig(...))`` runs the whole job and returns a summary; ``convnextv2
finetune`` is its command line. Every recipe value comes from a preset (``atto``, ``tiny``,
``base``; ``auto`` picks by model) unless the config sets it.

Written under ``output``: ``metrics.jsonl`` (one line per epoch), ``steps.jsonl`` (one line
per optimizer step: step, epoch, loss, lr), ``accuracy.png`` and ``loss.png``,
``best.safetensors`` (the weights, model or EMA, with the best validation top-1),
``last.safetensors`` (model weights after the last epoch; ``last_ema.safetensors`` too when EMA
is on), run states ``checkpoint-<step>.pt`` for ``resume="auto"`` (the training engine's format,
plus the EMA weights; after every epoch and every ``save_every_steps`` steps, the newest
``keep_last`` kept) and ``summary.json``. The safetensors files are native checkpoints carrying
the class names, image size and recipe in their metadata.

Reproducibility, as in pretraining: the sample order is a function of (seed, epoch), each
image's augmentation of (seed, epoch, sample index) (``KeyedAugmentDataset``), and mixup/cutmix
draws of (seed, optimizer step, micro-batch) (``keyed_mixup`` reseeds the global RNGs timm's
``Mixup`` reads for the call and restores them after). A run resumed mid-epoch therefore
repeats the uninterrupted run's per-step losses (bit for bit with ``deterministic`` on CPU).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .layer_decay import param_groups_layer_decay
from ..training.schedule import clip_warmup_epochs, scaled_lr, set_lr, warmup_cosine_lr

# values shared by every preset; a preset overrides some of them. effective_batch is the
# official runs' (informational: lr = blr * the actual effective batch / 256)
COMMON = dict(
    epochs=100, batch_size=32, effective_batch=1024, blr=5e-4, min_lr=1e-6, warmup_epochs=20,
    weight_decay=0.05, layer_decay=0.9, layer_decay_mode="single", drop_path=0.1,
    smoothing=0.1, mixup=0.8, cutmix=1.0, reprob=0.25, auto_augment="rand-m9-mstd0.5-inc1",
    model_ema=True, model_ema_decay=0.9999, betas=(0.9, 0.999), clip_grad=None,
)

PRESETS = {
    "atto": dict(epochs=600, blr=2e-4, layer_decay=0.9, weight_decay=0.3, drop_path=0.1,
                 smoothing=0.2, mixup=0.0, cutmix=0.0, warmup_epochs=0),
    "tiny": dict(epochs=300, blr=8e-4, layer_decay=0.9, drop_path=0.2, warmup_epochs=40),
    "base": dict(epochs=100, blr=6.25e-4, layer_decay=0.6, layer_decay_mode="group",
                 drop_path=0.1, warmup_epochs=20),
}
RECIPES = ("auto", *PRESETS)

_AUTO = {"convnextv2_atto": "atto", "convnextv2_femto": "atto", "convnextv2_pico": "atto",
         "convnextv2_nano": "tiny", "convnextv2_tiny": "tiny", "convnextv2_base": "base",
         "convnextv2_large": "base", "convnextv2_huge": "base"}


def auto_preset(model_name: str | None, depths=None) -> str:
    """The preset for a variant name, or for a custom ``depths`` (by block count)."""
    if depths is not None and model_name is None:
        n = sum(depths)
        return "atto" if n < 15 else ("tiny" if n < 30 else "base")
    from ..models.registry import resolve_name
    return _AUTO[resolve_name(model_name)]


def resolve_recipe(model_name: str | None, recipe: str = "auto", depths=None) -> dict:
    """COMMON updated with the preset (``recipe`` or the one ``auto`` picks); adds ``recipe``."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    name = auto_preset(model_name, depths) if recipe == "auto" else recipe
    values = dict(COMMON)
    values.update(PRESETS[name])
    values["recipe"] = name
    return values


# --linear-probe: MAE-style probing values (90 epochs, 10 warmup, no regularisation); AdamW
# with blr 1e-3 here instead of MAE's LARS with blr 0.1
LINEAR_PROBE = dict(epochs=90, blr=1e-3, weight_decay=0.0, layer_decay=1.0, drop_path=0.0,
                    smoothing=0.0, mixup=0.0, cutmix=0.0, reprob=0.0, auto_augment=None,
                    model_ema=False, warmup_epochs=10)


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``None`` means: take the value from the recipe."""

    model: str | None = "convnextv2_atto"
    data: str = "builtin"
    output: str = "runs/finetune"
    finetune: str | None = None            # checkpoint to start from (any layout)
    recipe: str = "auto"
    model_kwargs: dict = field(default_factory=dict)  # depths, dims, stem_stride, in_chans, ...
    img_size: int | None = None            # default: 224, or 32 for IDX / built-in data
    in_chans: int | None = None            # default: the checkpoint's, else 3
    linear_probe: bool = False
    epochs: int | None = None
    batch_size: int | None = None
    accum_iter: int = 1
    lr: float | None = None                # absolute lr; default blr * effective batch / 256
    blr: float | None = None
    min_lr: float | None = None
    warmup_epochs: float | None = None
    weight_decay: float | None = None
    layer_decay: float | None = None
    layer_decay_mode: str | None = None
    drop_path: float | None = None
    smoothing: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    reprob: float | None = None
    auto_augment: str | None = None        # "none" disables RandAugment
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    model_ema: bool | None = None
    model_ema_decay: float | None = None
    model_ema_warmup: bool = False         # timm's decay warmup, for short runs
    clip_grad: float | None = None
    amp: str | None = None                 # "bf16" / "fp16" autocast; None / "none": float32
    head_init_std: float = 2e-5
    workers: int = 0
    seed: int = 0
    device: str | None = None
    resume: str | None = None              # "auto" or a checkpoint-*.pt run state
    max_steps_per_epoch: int | None = None  # cap the batches per epoch (tests, demos)
    train_subset: int | None = None        # train on N random training images only
    val_subset: int | None = None          # evaluate on N random validation images only
    progress: bool = True
    strict_data: bool = False
    deterministic: bool = False            # torch deterministic algorithms (bitwise resume)
    max_steps: int | None = None           # stop after this many optimizer steps in total
    save_every_steps: int = 0              # also save a run state every N steps in an epoch
    keep_last: int = 2                     # run states kept (0: all)
    fsdp: bool = False                     # shard with FSDP2 (fully_shard) instead of DDP


def resolve(cfg: FinetuneConfig, depths=None) -> dict:
    """The effective hyper-parameters: recipe values overridden by every non-None config field."""
    values = resolve_recipe(cfg.model if depths is None else None, cfg.recipe, depths)
    if cfg.linear_probe:
        values.update(LINEAR_PROBE)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in values and v is not None:
            values[f.name] = v
    if cfg.warmup_epochs is None:  # a recipe's 20-40 warmup epochs would swallow a short run
        values["warmup_epochs"] = clip_warmup_epochs(values["warmup_epochs"], values["epochs"])
    if values.get("auto_augment") in ("none", "None", ""):
        values["auto_augment"] = None
    if values["batch_size"] < 1 or cfg.accum_iter < 1 or values["epochs"] < 1:
        raise ValueError("--epochs, --batch-size and --accum-iter must be >= 1")
    return values


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
    from ..models.registry import model_config

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
    from ..models.model import ConvNeXtV2

    config = finetune_architecture(model_name, checkpoint, **model_kwargs)
    config.update(num_classes=num_classes, drop_path_rate=drop_path, head_init_scale=0.001)
    model = ConvNeXtV2(**config)
    report: dict = {}
    if checkpoint:
        from ..checkpoint import load_checkpoint
        report = load_checkpoint(model, checkpoint, strict=True, drop_head=True)
        reinit_head(model, head_init_std)
    return model, report


def _checkpoint_config(path: str) -> dict:
    """The architecture a checkpoint stores (native files) or implies by its tensor shapes."""
    from ..checkpoint import infer_config
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


def _criterion(hp: dict, mixup_active: bool):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_active:
        return SoftTargetCrossEntropy()
    if hp["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=hp["smoothing"])
    return nn.CrossEntropyLoss()


def _default_img_size(data: str) -> int:
    from ..data import is_idx_folder
    return 32 if str(data) == "builtin" or is_idx_folder(Path(data)) else 224


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one fine-tuning job (see the module docstring for what it writes).

    Launched by ``torchrun`` it trains data-parallel (each rank evaluates its share of the
    validation set, every image counted once; rank 0 writes), or sharded with ``fsdp``. A run
    state is saved after every epoch and every ``save_every_steps`` optimizer steps;
    ``resume="auto"`` continues after the newest one, restoring model, EMA, optimizer, RNG
    states and the position inside the epoch.
    """
    from .pretrain import set_deterministic
    from ..training import cleanup_distributed, init_distributed

    _check_run_options(cfg)
    dist = init_distributed(cfg.device)
    previous_det = set_deterministic(cfg.deterministic)
    try:
        return _finetune(cfg, dist)
    finally:
        set_deterministic(previous_det)
        cleanup_distributed()


def _check_run_options(cfg: FinetuneConfig) -> None:
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {cfg.max_steps}")
    if cfg.save_every_steps < 0:
        raise ValueError(f"--save-every-steps must be >= 0, got {cfg.save_every_steps}")
    if cfg.keep_last < 0:
        raise ValueError(f"--keep-last must be >= 0 (0 keeps every checkpoint), "
                         f"got {cfg.keep_last}")
    if cfg.fsdp and cfg.linear_probe:
        raise ValueError("--fsdp with --linear-probe: a probe trains one Linear layer; "
                         "drop --fsdp (DDP is used under torchrun)")


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
    from ..training import sample_key
    with keyed_rng(sample_key(seed, step, micro, salt="mixup")):
        return mixup_fn(x, y)


def _finetune(cfg: FinetuneConfig, dist) -> dict:
    from timm.data import Mixup
    from timm.utils import ModelEmaV3
    from torch.utils.data import DataLoader, Subset

    from ..data import build_dataset, eval_transform, train_transform
    from ..models.model import ConvNeXtV2
    from ..training.dist_eval import evaluate_distributed as evaluate
    from ..training.dist_eval import sharded_loader
    from ..training import (AccumulatingStep, KeyedAugmentDataset, MetricsLog, ResumableSampler,
                           all_reduce_mean, apply_run_state, barrier, broadcast_object,
                           build_run_state, build_sampler, check_amp, effective_batch,
                           load_run_state, plot_curves, resolve_resume, save_run_state, wrap_ddp)

    from .pretrain import check_output_writable
    out = check_output_writable(cfg.output)  # any OSError -> one clear PermissionError
    device = dist.device
    amp = cfg.amp or "none"
    check_amp(amp, device)
    _seed_everything(cfg.seed + dist.rank)

    # data (its classes size the head), then the model (its channels shape the transforms)
    train_ds = build_dataset(cfg.data, "train", strict=cfg.strict_data, labelled=True)
    classes = list(train_ds.classes)
    num_classes = len(classes)
    model_kwargs = {**cfg.model_kwargs, **({"in_chans": cfg.in_chans} if cfg.in_chans else {})}
    arch = finetune_architecture(cfg.model, cfg.finetune, **model_kwargs)
    hp = resolve(cfg, None if cfg.model else arch["depths"])
    if cfg.fsdp and hp["model_ema"]:
        raise ValueError("--fsdp with model EMA: the EMA copy would not be sharded; add "
                         "--no-model-ema")
    model, load_report = build_finetune_model(
        cfg.model, num_classes, cfg.finetune, drop_path=hp["drop_path"],
        head_init_std=cfg.head_init_std, **model_kwargs)
    model_config = dict(model.config)
    in_chans = model.config["in_chans"]
    img_size = cfg.img_size or _default_img_size(cfg.data)
    train_ds.transform = train_transform(img_size, in_chans, auto_augment=hp["auto_augment"],
                                         reprob=hp["reprob"], scale=tuple(cfg.crop_scale))
    val_ds = build_dataset(cfg.data, "val", eval_transform(img_size, in_chans),
                           strict=cfg.strict_data, labelled=True)
    if val_ds.classes != classes:
        raise ValueError(f"{cfg.data}: the train and val splits have different classes "
                         f"({len(classes)} vs {len(val_ds.classes)})")
    skipped = train_ds.num_skipped + val_ds.num_skipped
    if cfg.train_subset:
        gen = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(len(train_ds), generator=gen)[:cfg.train_subset].sort().values
        train_ds = Subset(train_ds, keep.tolist())
    if cfg.val_subset:
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        keep = torch.randperm(len(val_ds), generator=gen)[:cfg.val_subset].sort().values
        val_ds = Subset(val_ds, keep.tolist())

    mixup_active = hp["mixup"] > 0 or hp["cutmix"] > 0
    batch = hp["batch_size"]
    if mixup_active and len(train_ds) < batch * dist.world_size:
        raise ValueError(f"mixup/cutmix need full batches: {len(train_ds)} training images < "
                         f"--batch-size {batch} x {dist.world_size} processes")
    # order keyed by (seed, epoch), each image's augmentation by (seed, epoch, index): the
    # same whatever the number of processes or workers, and resumable mid-epoch
    keyed = KeyedAugmentDataset(train_ds, cfg.seed)
    sampler = ResumableSampler(build_sampler(keyed, dist, shuffle=True, seed=cfg.seed))
    train_loader = DataLoader(keyed, batch_size=batch, sampler=sampler,
                              drop_last=mixup_active, num_workers=cfg.workers,
                              generator=torch.Generator().manual_seed(cfg.seed),
                              persistent_workers=False)  # workers must see each set_epoch
    # each rank scores an unpadded share of the validation set; evaluate() sums over ranks.
    # Sharded (FSDP) weights are gathered into one copy that rank 0 scores on the whole set.
    val_loader = sharded_loader(val_ds, dist, batch_size=max(2 * batch, 64),
                                num_workers=cfg.workers)
    if cfg.fsdp and dist.distributed:
        val_loader = DataLoader(val_ds, batch_size=max(2 * batch, 64), shuffle=False,
                                num_workers=cfg.workers)
    mixup_fn = (Mixup(mixup_alpha=hp["mixup"], cutmix_alpha=hp["cutmix"],
                      label_smoothing=hp["smoothing"], num_classes=num_classes)
                if mixup_active else None)
    criterion = _criterion(hp, mixup_active)

    probe_head = LinearProbe(model, num_classes) if cfg.linear_probe else None
    model.to(device)
    if cfg.fsdp:  # before the optimizer: sharding replaces the parameters
        from ..training import fsdp
        fsdp.shard(model, dist)
    groups = param_groups_layer_decay(model, hp["weight_decay"], hp["layer_decay"],
                                      hp["layer_decay_mode"])
    eff_batch = effective_batch(batch, cfg.accum_iter, dist.world_size)
    base_lr = cfg.lr if cfg.lr is not None else scaled_lr(hp["blr"], eff_batch)
    optimizer = torch.optim.AdamW([{k: g[k] for k in ("params", "weight_decay", "lr_scale")}
                                   for g in groups], lr=base_lr, betas=tuple(hp["betas"]))
    ema = (ModelEmaV3(model, decay=hp["model_ema_decay"], use_warmup=cfg.model_ema_warmup)
           if hp["model_ema"] else None)
    train_model = model if cfg.fsdp else wrap_ddp(model, dist)
    stepper = AccumulatingStep(train_model, optimizer, accum_steps=cfg.accum_iter, amp=amp,
                               device=device, clip_grad=hp["clip_grad"])

    batches_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        batches_per_epoch = min(batches_per_epoch, cfg.max_steps_per_epoch * cfg.accum_iter)
    if batches_per_epoch < cfg.accum_iter:
        raise ValueError(f"too few training batches ({batches_per_epoch}) for --accum-iter "
                         f"{cfg.accum_iter}: {len(train_ds)} images, batch {batch}")
    steps_per_epoch = batches_per_epoch // cfg.accum_iter  # optimizer steps
    batches_per_epoch = steps_per_epoch * cfg.accum_iter    # no half-accumulated step at the end
    total_steps = hp["epochs"] * steps_per_epoch
    warmup_steps = round(hp["warmup_epochs"] * steps_per_epoch)
    stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    state = dict(best_top1=-1.0, best_source=None, best_epoch=None, history=[])
    epoch, batches_done, global_step = 0, 0, 0
    loss_sum, seen = 0.0, 0  # this epoch's running train loss (carried across a resume)
    resume_path = broadcast_object(resolve_resume(cfg.resume, out) if dist.is_main else None)
    if resume_path is not None:
        saved = load_run_state(resume_path)
        apply = fsdp.apply_run_state if cfg.fsdp else apply_run_state
        try:
            pos = apply(saved, model=model, optimizer=optimizer, scaler=stepper.scaler)
        except RuntimeError as e:
            raise ValueError(f"--resume {resume_path}: its weights do not fit this model "
                             f"({str(e).splitlines()[0]}); resume with the same --model and "
                             f"shape options") from None
        if ema is not None and saved.get("ema") is not None:
            ema.module.load_state_dict(saved["ema"])
        extra = saved["extra"]
        state = json.loads(extra["finetune_state"])
        epoch, batches_done, global_step = pos["epoch"], pos["batches_done"], pos["global_step"]
        if batches_done >= batches_per_epoch:
            epoch, batches_done = epoch + 1, 0
        if batches_done:
            loss_sum = float(extra.get("epoch_loss_sum", 0.0))
            seen = int(extra.get("epoch_seen", 0))
        if dist.is_main:
            where = f"epoch {epoch + 1}, batch {batches_done}" if batches_done else \
                f"after epoch {epoch}"
            print(f"resumed from {resume_path}: {where}, step {global_step}", flush=True)
    resumed_step = global_step if resume_path else None
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=resumed_step, enabled=dist.is_main)
    steps_log = MetricsLog(out / "steps.jsonl", resume_step=resumed_step, enabled=dist.is_main)
    meta = dict(class_names=classes, img_size=img_size, in_chans=in_chans, recipe=hp["recipe"],
                data=str(cfg.data), linear_probe=cfg.linear_probe)
    if dist.is_main:
        _write_json(out / "config.json", dict(
            config=dataclasses.asdict(cfg), hyperparameters=hp, base_lr=base_lr,
            effective_batch=eff_batch, world_size=dist.world_size, model_config=model.config,
            classes=classes, load_report=load_report, skipped_images=skipped))
    if dist.is_main and skipped:
        print(f"note: skipped {skipped} unreadable image(s) in {cfg.data} (listed by the "
              f"dataset's .skipped; --strict-data makes them fatal)", flush=True)

    def save_state(ep: int, done: int) -> None:
        """Run state at ``done`` micro-batches into epoch ``ep`` (0-based; ``done`` 0 with
        ``ep`` = the next epoch after one ends). FSDP: gathered on every rank, rank 0 writes."""
        src_model, src_optim = (fsdp.full_state_views(model, optimizer) if cfg.fsdp
                                else (model, optimizer))
        if dist.is_main:
            run_state = build_run_state(
                model=src_model, optimizer=src_optim, epoch=ep, batches_done=done,
                global_step=global_step, args=dataclasses.asdict(cfg), scaler=stepper.scaler,
                data_order=dict(seed=cfg.seed, kind="distributed-sampler"),
                extra=dict(finetune_state=json.dumps(state), epoch_loss_sum=loss_sum,
                           epoch_seen=seen, world_size=dist.world_size))
            run_state["ema"] = ema.module.state_dict() if ema is not None else None
            save_run_state(out, run_state, keep_last=cfg.keep_last)
        barrier()

    t_start = time.time()
    lr = base_lr
    while epoch < hp["epochs"] and global_step < stop_at:
        t_epoch = time.time()
        sampler.set_epoch(epoch, skip=batches_done * batch)
        keyed.set_epoch(epoch)
        if batches_done == 0:
            loss_sum, seen = 0.0, 0
        if probe_head:
            probe_head.train_mode()
        else:
            model.train()
        bar = None
        if cfg.progress and dist.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps_per_epoch, initial=batches_done // cfg.accum_iter,
                       desc=f"finetune {epoch + 1}/{hp['epochs']}", dynamic_ncols=True,
                       leave=False)
        batches = iter(train_loader)
        step_losses = []
        stopped = False
        for b in range(batches_done, batches_per_epoch):
            x, y = next(batches)
            if stepper.micro == 0:
                lr = warmup_cosine_lr(global_step, base_lr=base_lr, total_steps=total_steps,
                                      warmup_steps=warmup_steps, min_lr=hp["min_lr"])
                set_lr(optimizer, lr)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup_fn is not None:
                x, y = keyed_mixup(mixup_fn, x, y, cfg.seed, global_step, stepper.micro)
            with stepper.micro_batch():
                logits = train_model(x)
            loss = criterion(logits.float(), y)
            value = float(all_reduce_mean(loss.detach().float()))
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at epoch {epoch + 1}, "
                                         f"step {global_step}; no checkpoint written for it")
            step_losses.append(value)
            loss_sum += loss.item() * len(x)
            seen += len(x)
            if not stepper.backward(loss):
                continue
            global_step += 1
            if ema is not None:
                ema.update(model, step=global_step)
            step_loss = sum(step_losses) / len(step_losses)
            step_losses = []
            steps_log.log(dict(step=global_step, epoch=epoch + 1, loss=step_loss, lr=lr))
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
            done = b + 1
            if done < batches_per_epoch:  # an epoch's end is saved below, after validation
                if global_step >= stop_at:
                    save_state(epoch, done)
                    stopped = True
                    break
                if cfg.save_every_steps and global_step % cfg.save_every_steps == 0:
                    save_state(epoch, done)
        if bar:
            bar.close()
        if stopped:  # by max_steps, inside the epoch; the run state is saved
            break
        batches_done = 0
        train_time = time.time() - t_epoch
        record = dict(step=global_step, epoch=epoch + 1, train_loss=loss_sum / max(seen, 1),
                      lr=lr, img_per_s=seen * dist.world_size / train_time)
        if cfg.fsdp and dist.distributed:  # one gathered copy, scored and saved by rank 0
            plain = fsdp.unsharded_copy(model, lambda: ConvNeXtV2(**model_config), device,
                                        dist.is_main)
            from .evaluate import evaluate as evaluate_one
            scores = broadcast_object(evaluate_one(plain, val_loader, num_classes, device, amp)
                                      if dist.is_main else None)
            weights_model = plain
        else:
            scores = evaluate(model, val_loader, num_classes, device, amp)
            weights_model = model
        record.update(val_loss=scores["loss"], val_top1=scores["top1"], val_top5=scores["top5"])
        candidates = {"model": (scores["top1"], weights_model)}
        if ema is not None:
            ema_scores = evaluate(ema.module, val_loader, num_classes, device, amp)
            record.update(ema_val_loss=ema_scores["loss"], ema_val_top1=ema_scores["top1"],
                          ema_val_top5=ema_scores["top5"])
            candidates["ema"] = (ema_scores["top1"], ema.module)
        record["epoch_time_s"] = time.time() - t_epoch
        state["history"].append(record)
        source = max(candidates, key=lambda k: candidates[k][0])
        top1, weights = candidates[source]
        improved = top1 > state["best_top1"]
        if improved:
            state.update(best_top1=top1, best_source=source, best_epoch=epoch + 1)
        epoch += 1
        if dist.is_main:
            if improved:
                _save_weights(weights, out / "best.safetensors",
                              dict(meta, epoch=epoch, weights=source, top1=top1))
            _save_weights(weights_model, out / "last.safetensors",
                          dict(meta, epoch=epoch, weights="model", top1=scores["top1"]))
            if ema is not None:
                _save_weights(ema.module, out / "last_ema.safetensors",
                              dict(meta, epoch=epoch, weights="ema", top1=ema_scores["top1"]))
            metrics.log(record)
        save_state(epoch, 0)
        if dist.is_main:
            plot_curves(state["history"], out / "accuracy.png",
                        keys=("val_top1", "ema_val_top1"), x="epoch", title="validation top-1 (%)")
            plot_curves(state["history"], out / "loss.png",
                        keys=("train_loss", "val_loss", "ema_val_loss"), x="epoch", title="loss")
            if cfg.progress:
                msg = (f"epoch {epoch}/{hp['epochs']}: train loss {record['train_loss']:.4f}"
                       f", val top-1 {scores['top1']:.2f}%")
                if ema is not None:
                    msg += f", EMA top-1 {ema_scores['top1']:.2f}%"
                print(msg, flush=True)
    metrics.close()
    steps_log.close()
    summary = dict(best_top1=state["best_top1"], best_source=state["best_source"],
                   best_epoch=state["best_epoch"], epochs=hp["epochs"],
                   final=state["history"][-1] if state["history"] else None,
                   train_time_s=time.time() - t_start, classes=classes, output=str(out),
                   skipped_images=skipped, base_lr=base_lr, recipe=hp["recipe"],
                   best=str(out / "best.safetensors"), last=str(out / "last.safetensors"),
                   rank=dist.rank, global_step=global_step)
    if dist.is_main:
        _write_json(out / "summary.json", summary)
    if cfg.fsdp and dist.distributed:
        model = fsdp.unsharded_copy(model, lambda: ConvNeXtV2(**model_config), device,
                                    dist.is_main)
    summary["model"] = LinearProbe.folded(model) if probe_head and model is not None else model
    summary["ema"] = ema.module if ema is not None else None
    summary["history"] = state["history"]
    return summary


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _save_weights(model: nn.Module, path: Path, metadata: dict) -> None:
    """Native safetensors with ``metadata``; a linear-probe head is folded to a Linear first."""
    from ..checkpoint import save_checkpoint
    if isinstance(getattr(model.head, "fc", None), nn.Sequential):
        model = LinearProbe.folded(model)
    save_checkpoint(model, path, layout="native", metadata=_string_metadata(metadata))


def _string_metadata(metadata: dict) -> dict[str, str]:
    """safetensors metadata holds strings: lists and numbers are stored as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _write_json(path: Path, obj) -> None:
    from ..training.runstate import plain
    path.write_text(json.dumps(plain(obj), indent=2))
