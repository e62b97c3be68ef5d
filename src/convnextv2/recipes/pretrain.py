"""FCMAE pretraining with the official recipe as defaults (docs/pretraining.md, docs/recipes.md).

``pretrain(PretrainConfig(...))`` runs the job and returns a summary; ``convnextv2 pretrain``
is its command line. The loop, resume, checkpoints and logs are the training engine's
(``training.loop.Trainer``); this module builds FCMAE, its data and optimizer, and says what a
step computes.

Written under ``output``:
  metrics.jsonl                one JSON line per optimizer step (step, epoch, loss, lr, img_per_s)
  checkpoint-<step>.pt         run state after each epoch (and every ``save_every_steps``)
  loss_curve.png               loss against step, redrawn every epoch and at the end
  reconstruction_epNNNN.png    fixed images / fixed mask every ``recon_every`` epochs
  reconstruction.png           the same at the end
  encoder.safetensors          the encoder, native layout (``create_model(name, pretrained=...)``)
  fcmae.safetensors            encoder + decoder (``load_fcmae``)
  config.json                  the options, the encoder's configuration, the learning rate
  summary.json                 what the run ended with: steps, losses, options, files

``freeze_encoder`` (with ``init``) trains the decoder and mask token alone on the features of
a given encoder (timm, HF, official or ours): the encoder stays bit-identical, and the run's
``fcmae.safetensors`` can then reconstruct, or start a full pretraining run with a decoder
that already fits the encoder.

Reproducibility: the sample order is a function of (seed, epoch), each image's augmentation
and mask a function of (seed, epoch, sample index), so results do not depend on the number
of processes or data-loader workers, and a run resumed mid-epoch continues with exactly the
batches, masks and losses of the uninterrupted run (bit for bit with ``deterministic``).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from .. import training as T
from ..checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from ..data import (IndexedDataset, build_dataset, describe_source, eval_transform, mean_std,
                    pretrain_transform)
from ..data import device_decode, first_items
from ..data.shards import ShardLoader, is_shard_source, open_shards
from ..data.idx import is_idx_folder
from ..fcmae import io as fcmae_io
from ..fcmae.fcmae import FCMAE
from ..fcmae.masking import keyed_mask
from ..fcmae.sparse import DWCONV_KERNELS, resolve_dwconv
from ..models.registry import create_model
from ..training import fsdp
from ..training.config import RunConfig
from ..training.output import check_writable
from ..training.loop import NonFiniteLossError, seed_everything, set_deterministic  # noqa: F401
from .monitor import MonitorData, PretrainMonitor, open_monitor_data
from .presets import PRETRAIN

RECON_IMAGES = 8
RECON_EPOCH_KEY = -1  # the reconstruction mask's "epoch": fixed, unlike every training epoch
# options that make a resumed run another run (refused), and ones that only change its course
RESUME_MUST_MATCH = ("model", "depths", "dims", "stem_stride", "in_chans", "v1_block",
                     "model_kwargs", "img_size", "data", "effective_batch", "seed", "mask_ratio",
                     "decoder_depth", "decoder_dim", "norm_pix_loss", "wd_exempt",
                     "freeze_encoder")
RESUME_MAY_CHANGE = ("epochs", "blr", "lr", "min_lr", "warmup_epochs", "warmup_steps",
                     "weight_decay", "betas", "clip_grad", "amp", "backend", "sparse_dwconv",
                     "decode", "monitor_data", "monitor_every", "monitor_images")


@dataclass
class PretrainConfig(RunConfig):
    """Options of a pretraining run; ``None`` means "the recipe's value" where noted."""
    output: str = "runs/fcmae"
    epochs: int = PRETRAIN["epochs"]
    batch_size: int = 64                 # per process and micro-batch
    img_size: int = 224
    mask_ratio: float = PRETRAIN["mask_ratio"]
    norm_pix_loss: bool = PRETRAIN["norm_pix_loss"]
    decoder_depth: int = PRETRAIN["decoder_depth"]
    decoder_dim: int = PRETRAIN["decoder_dim"]
    backend: str = "sparse"
    sparse_dwconv: str = "grid"          # the sparse depthwise kernel: "grid" or "triton"
    blr: float = PRETRAIN["blr"]
    lr: float | None = None              # None: blr * effective batch / 256
    min_lr: float = PRETRAIN["min_lr"]
    warmup_epochs: float | None = None   # None: the recipe's 40, capped at a quarter of the run
    warmup_steps: int | None = None      # > 0: the warmup in optimizer steps (overrides epochs)
    weight_decay: float = PRETRAIN["weight_decay"]
    wd_exempt: str = "official"          # "official": biases and 1-D tensors but not GRN;
    #                                      "grn": also GRN gamma/beta and the mask token
    betas: Sequence[float] = PRETRAIN["betas"]
    clip_grad: float | None = None
    recon_every: int = 10
    init: str | None = None              # start from these weights (FCMAE file or an encoder)
    freeze_encoder: bool = False         # train the decoder and mask token only (needs init)
    monitor_data: str | None = None      # labelled folder: k-NN and collapse probes (monitor.py)
    monitor_every: int = 1               # epochs between probes
    monitor_images: int = 1000           # at most this many bank and query images each
    decode: str = "cpu"                  # "device": JPEGs decoded and augmented on the training
    #                                      device (data/device_decode.py), workers read bytes

    def __post_init__(self):
        self.in_chans = self.in_chans or 3


def check_output_writable(output: str | Path) -> Path:
    """Create ``output`` and prove a file can be written there (kept for other commands)."""
    return check_writable(output, create=True)


def _check_config(cfg: PretrainConfig) -> None:
    """Refuse values that cannot train, before anything is written."""
    for name in ("epochs", "batch_size", "img_size", "decoder_dim"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.decoder_depth < 0:
        raise ValueError(f"--decoder-depth must be >= 0, got {cfg.decoder_depth}")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}: the loss is "
                         f"computed on the masked patches only, so 0 leaves nothing to learn")
    if cfg.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if cfg.wd_exempt not in T.PRETRAIN_NO_DECAY:
        raise ValueError(f"--wd-exempt must be one of {', '.join(T.PRETRAIN_NO_DECAY)}, "
                         f"got {cfg.wd_exempt!r}")
    if cfg.backend not in ("sparse", "dense"):
        raise ValueError(f"--backend must be sparse or dense, got {cfg.backend!r}")
    if cfg.sparse_dwconv not in DWCONV_KERNELS:
        raise ValueError(f"--sparse-dwconv must be one of {', '.join(DWCONV_KERNELS)}, "
                         f"got {cfg.sparse_dwconv!r}")
    _check_decode(cfg)
    if cfg.freeze_encoder and not cfg.init:
        raise ValueError("--freeze-encoder needs --init ENCODER: it trains the decoder on the "
                         "features of given encoder weights, and without --init the encoder "
                         "would stay at its random initialisation")
    if cfg.recon_every < 0:
        raise ValueError(f"--recon-every must be >= 0, got {cfg.recon_every}")
    for name in ("monitor_every", "monitor_images"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.monitor_data and cfg.fsdp:
        raise ValueError("--monitor-data with --fsdp: the probes run the encoder on each "
                         "process's own share of the images, which sharded weights cannot; "
                         "drop one of them")
    for name in ("blr", "min_lr", "lr", "warmup_epochs", "warmup_steps", "clip_grad"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def _check_decode(cfg: PretrainConfig) -> None:
    """``--decode device`` decodes image files to RGB: refuse what it cannot take (in-memory
    arrays, grayscale models) here, before anything is written, rather than quietly falling
    back to the CPU path the user asked to leave."""
    if cfg.decode not in ("cpu", "device"):
        raise ValueError(f"--decode must be cpu or device, got {cfg.decode!r}")
    if cfg.decode == "cpu":
        return
    if cfg.in_chans != 3:
        raise ValueError(f"--decode device decodes RGB images; --in-chans {cfg.in_chans} needs "
                         f"--decode cpu")
    if str(cfg.data) == "builtin" or is_idx_folder(Path(cfg.data).expanduser()):
        raise ValueError(f"--decode device reads image files; --data {cfg.data} holds IDX "
                         f"arrays: use --decode cpu")


def build_fcmae(cfg: PretrainConfig):
    """The FCMAE module of ``cfg``: the encoder variant (reshaped as asked) and the decoder."""
    encoder = create_model(cfg.model, num_classes=0, **cfg.architecture())
    fcmae = FCMAE(encoder, mask_ratio=cfg.mask_ratio, decoder_depth=cfg.decoder_depth,
                  decoder_embed_dim=cfg.decoder_dim, norm_pix_loss=cfg.norm_pix_loss,
                  backend=cfg.backend, sparse_dwconv=cfg.sparse_dwconv)
    # FCMAE never uses the encoder's final norm/head: freeze it so DDP does not wait for
    # gradients that never come (it is still saved, at its initial values)
    fcmae.encoder.head.requires_grad_(False)
    p = fcmae.patch_size
    if cfg.img_size % p or cfg.img_size < p:
        ok = ", ".join(str(p * k) for k in (1, 2, 4, 7))
        raise ValueError(f"--img-size {cfg.img_size} must be a multiple of the patch size {p} "
                         f"(total stride of the encoder), e.g. {ok}; --stem-stride 1 or 2 "
                         f"gives patches of 8 or 16 px for small images")
    return fcmae


def load_init(fcmae, path: str) -> str:
    """Start from pretrained weights: encoder and decoder from an FCMAE file (``fcmae.
    safetensors``, or an official FCMAE ``.pth`` with its decoder), else the encoder alone from
    any checkpoint, the decoder left as initialised. ``path`` may be a released name
    (``convnextv2_atto.fcmae``); an RGB stem is adapted to ``--in-chans``. Returns what was
    loaded, for the log."""
    name, path = path, resolve_checkpoint(path)
    try:
        source = fcmae_io.load_fcmae(path, backend=fcmae.backend)
    except ValueError as e:
        if "with a decoder" not in str(e):
            raise
        report = load_checkpoint(fcmae.encoder, path, strict=True, drop_head=True)
        stem = "" if report["stem"] == "loaded" else f"; stem {report['stem']}"
        return f"--init {name}: encoder weights (the file has no decoder; it starts fresh){stem}"
    try:
        fcmae.load_state_dict(source.state_dict())
    except RuntimeError as e:
        raise ValueError(f"--init {name}: its weights do not fit this model "
                         f"({str(e).splitlines()[-1].strip()}); use the same --model, shape "
                         f"and --decoder-* options") from None
    return f"--init {name}: encoder and decoder weights"


def freeze_encoder(fcmae) -> int:
    """Stop the encoder from learning: no gradients (so the optimizer never holds, decays or
    moves its weights) and evaluation mode in every epoch (stochastic depth off), so that the
    decoder learns from the encoder's own features. Returns the trainable parameter count."""
    fcmae.encoder.requires_grad_(False)
    return sum(p.numel() for p in fcmae.parameters() if p.requires_grad)


def train_mode(fcmae, cfg: PretrainConfig):
    """What puts the model in training mode before each epoch: all of it, or with a frozen
    encoder all but the encoder."""
    def train():
        fcmae.train()
        if cfg.freeze_encoder:
            fcmae.encoder.eval()
    return train


def pretrain_param_groups(fcmae, cfg: PretrainConfig) -> list[dict]:
    """AdamW groups: decay on everything but what ``cfg.wd_exempt`` exempts (docs/recipes.md)."""
    return T.param_groups(fcmae, cfg.weight_decay, no_decay=T.PRETRAIN_NO_DECAY[cfg.wd_exempt])


def resolve_warmup(cfg: PretrainConfig) -> tuple[float, str | None]:
    """Warmup epochs to use and a note when the recipe's 40 was shortened for a short run (no
    note when ``warmup_steps`` sets the warmup instead)."""
    if cfg.warmup_epochs is not None:
        return min(float(cfg.warmup_epochs), float(cfg.epochs)), None
    recipe = PRETRAIN["warmup_epochs"]
    warmup = T.clip_warmup_epochs(recipe, cfg.epochs)
    if warmup >= recipe or cfg.warmup_steps:
        return warmup, None
    return warmup, (f"warmup: the recipe's {recipe} epochs exceed a quarter of this "
                    f"{cfg.epochs}-epoch run; using {warmup:g} (set --warmup-epochs or "
                    f"--warmup-steps to override)")


# -- outputs ---------------------------------------------------------------------------------
class _EncoderWeights:
    """The encoder as ``save_checkpoint`` sees it, minus the final norm/head: FCMAE never
    trains them (they stay at their initial values), and leaving them out makes the file an
    encoder-only checkpoint, which loads into a model with any head (like the official
    ``*_fcmae.pt`` weights)."""

    def __init__(self, encoder):
        self.config = dict(encoder.config)
        self._state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}

    def state_dict(self) -> dict:
        return self._state


def save_encoder(encoder, path: Path, metadata: dict[str, str]) -> Path:
    """The encoder in the native layout through the checkpoint module (loads with
    ``create_model(name, pretrained=path)`` whatever the model's number of classes)."""
    save_checkpoint(_EncoderWeights(encoder), path, layout="native", metadata=metadata)
    return path


def _reconstruction_saver():
    """What draws the reconstruction figures (a seam: tests replace it to skip figures)."""
    from ..analysis.reconstruction import save_reconstruction_grid
    return save_reconstruction_grid


def fixed_recon_batch(cfg: PretrainConfig, patch_size: int):
    """The same first images (deterministic resize, no random crop) and the same mask for
    every reconstruction figure of a run."""

    transform = eval_transform(cfg.img_size, cfg.in_chans, crop_pct=1.0)
    ds = (open_shards(cfg.data, "train", transform) if is_shard_source(cfg.data)
          else build_dataset(cfg.data, "train", transform))
    imgs = torch.stack([item[0] for item in first_items(ds, RECON_IMAGES)])
    n = len(imgs)
    grid = (cfg.img_size // patch_size,) * 2
    mask = keyed_mask(cfg.seed, RECON_EPOCH_KEY, range(n), grid, cfg.mask_ratio)
    return imgs, mask


def build_loader(cfg: PretrainConfig, info: T.DistInfo):
    """The training data: order keyed by (seed, epoch), augmentation by (seed, epoch, index).
    Returns ``(dataset, loader)``; batches are ``(images, targets, indices)``, the images an
    ``EncodedBatch`` (file bytes and crop boxes; ``batch_to_device`` decodes it) with
    ``cfg.decode == "device"``. Tar shards are streamed (``data.shards``)."""
    if is_shard_source(cfg.data):
        return _shard_loader(cfg, info)
    if cfg.decode == "device":
        base = build_dataset(cfg.data, "train", None, strict=cfg.strict_data)
        source = device_decode.EncodedImageDataset(base, cfg.img_size)
        collate = device_decode.collate_encoded
    else:
        base = build_dataset(cfg.data, "train", pretrain_transform(cfg.img_size, cfg.in_chans),
                             strict=cfg.strict_data)
        source, collate = base, None
    dataset = IndexedDataset(T.KeyedAugmentDataset(source, cfg.seed))
    sampler = T.ResumableSampler(T.build_sampler(dataset, info, shuffle=True, seed=cfg.seed))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=cfg.workers, drop_last=True, collate_fn=collate,
                        pin_memory=info.device.type == "cuda", worker_init_fn=T.worker_init,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        persistent_workers=False)  # workers must see each epoch's set_epoch
    return base, loader


def _shard_loader(cfg: PretrainConfig, info: T.DistInfo):
    if cfg.decode == "device":
        raise ValueError(f"--decode device reads image files; --data {cfg.data} is tar shards: "
                         f"use --decode cpu")
    base = open_shards(cfg.data, "train", pretrain_transform(cfg.img_size, cfg.in_chans),
                       strict=cfg.strict_data)
    base.for_training(seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                      workers=cfg.workers, batch_size=cfg.batch_size)
    return base, ShardLoader(base, pin_memory=info.device.type == "cuda")


def batch_to_device(cfg: PretrainConfig, device: torch.device, base):
    """What moves a loader batch's images to ``device``: a copy, or for ``--decode device``
    the decode, crop, flip and normalisation there."""
    if cfg.decode == "device":
        return device_decode.DeviceDecoder(cfg.img_size, device, base, cfg.strict_data)
    return lambda imgs: imgs.to(device, non_blocking=True)


# -- the run ---------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig) -> dict:
    """Run FCMAE pretraining; returns a summary dict (steps, last loss, written files)."""
    T.check_run_config(cfg)  # the shared options first, then the recipe's
    _check_config(cfg)
    if cfg.init:
        resolve_checkpoint(cfg.init)  # a released name is fetched (or refused) before --output
    probe_data = (open_monitor_data(cfg.monitor_data, cfg.img_size, cfg.in_chans,
                                    cfg.monitor_images, cfg.seed)
                  if cfg.monitor_data else None)  # a bad folder is refused before --output
    with T.run_session(cfg) as (info, out):
        return _pretrain(cfg, info, out, probe_data)


def _pretrain(cfg: PretrainConfig, info: T.DistInfo, out: Path,
              probe_data: MonitorData | None = None) -> dict:
    base, loader = build_loader(cfg, info)
    steps_per_epoch = len(loader) // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"{describe_source(cfg.data)} has {len(base)} images: too few for one "
                         f"optimizer step of {cfg.batch_size} x {cfg.accum_steps} (accum) x "
                         f"{info.world_size} (processes); lower --batch-size or --accum-steps")
    fcmae = build_fcmae(cfg)
    init_note = load_init(fcmae, cfg.init) if cfg.init else None
    if cfg.freeze_encoder:
        init_note += (f"; encoder frozen: training the decoder and mask token only "
                      f"({freeze_encoder(fcmae) / 1e6:.3g}M parameters)")
    fcmae.to(info.device)
    if cfg.fsdp:  # before the optimizer: sharding replaces the parameters
        fsdp.shard(fcmae, info)
    eff = T.effective_batch(cfg.batch_size, cfg.accum_steps, info.world_size)
    base_lr = cfg.lr if cfg.lr is not None else T.scaled_lr(cfg.blr, eff)
    optimizer = torch.optim.AdamW(pretrain_param_groups(fcmae, cfg), lr=base_lr,
                                  betas=tuple(cfg.betas))
    warmup, warmup_note = resolve_warmup(cfg)
    schedule = T.WarmupCosineSchedule(optimizer, base_lr=base_lr, epochs=cfg.epochs,
                                      steps_per_epoch=steps_per_epoch, warmup_epochs=warmup,
                                      warmup_steps=cfg.warmup_steps or None, min_lr=cfg.min_lr)
    trainer = T.Trainer(loader=loader,
        model=fcmae, optimizer=optimizer, schedule=schedule, cfg=cfg, info=info, out=out,
        args=dict(dataclasses.asdict(cfg), effective_batch=eff), images_per_step=eff,
        batches_per_epoch=steps_per_epoch * cfg.accum_steps,  # a partial accumulation is dropped
        total_steps=cfg.epochs * steps_per_epoch, clip_grad=cfg.clip_grad, desc="pretrain",
        step_fields=lambda: dict(skipped_images=getattr(base, "num_skipped", 0)),
        train_mode=train_mode(fcmae, cfg))
    trainer.resume(RESUME_MUST_MATCH, RESUME_MAY_CHANGE)
    trainer.write_json("config.json", dict(
        config=trainer.args, model_config=fcmae.encoder.config, base_lr=base_lr,
        effective_batch=eff, world_size=info.world_size, freeze_encoder=cfg.freeze_encoder))
    monitor = (PretrainMonitor(probe_data, cfg.monitor_every, info, out, cfg.amp,
                               cfg.batch_size, cfg.workers) if probe_data else None)
    with trainer.open_log("metrics.jsonl") as log:
        return _train(cfg, trainer, base, log, monitor, dict(effective_batch=eff, lr=base_lr,
                                                    steps_per_epoch=steps_per_epoch,
                                                    warmup_epochs=warmup,
                                                    warmup_steps=schedule.warmup_steps),
                      [warmup_note, init_note])


def _train(cfg: PretrainConfig, trainer: T.Trainer, base, log: T.RunLog,
           monitor: PretrainMonitor | None, facts: dict, notes: list) -> dict:
    info, fcmae = trainer.info, trainer.model
    grid = (cfg.img_size // fcmae.patch_size,) * 2
    figures = _Figures(cfg, fcmae, info, trainer.out, log)

    n_params = sum(p.numel() for p in fcmae.encoder.parameters()) / 1e6
    trainer.say(f"FCMAE pretraining: {cfg.model} ({n_params:.2f}M encoder params, patch "
                f"{fcmae.patch_size}, {cfg.backend} backend) on {describe_source(cfg.data)}: "
                f"{len(base)} images, {facts['steps_per_epoch']} steps/epoch, effective batch "
                f"{facts['effective_batch']}, lr {facts['lr']:.3g}, device {info.device}"
                + (f", {info.world_size} processes" if info.distributed else ""))
    dwconv_note = None
    if cfg.backend == "sparse" and cfg.sparse_dwconv == "triton":
        kernel = resolve_dwconv("triton", torch.empty(0, device=info.device))
        dwconv_note = ("depthwise 7x7: Triton kernels at visible sites" if kernel == "triton" else
                       f"--sparse-dwconv triton: Triton kernels need CUDA (and Triton); "
                       f"{info.device} runs the 'grid' kernel (same numbers)")
    for note in (*notes, dwconv_note, getattr(base, "num_skipped", 0)
                 and f"skipped {base.num_skipped} unreadable image(s)"):
        if note:
            trainer.say(note)

    to_device = batch_to_device(cfg, info.device, base)

    def forward(model, batch, key):
        imgs, _, index = batch
        imgs = to_device(imgs)
        mask = keyed_mask(cfg.seed, key.epoch, index, grid, cfg.mask_ratio, device=info.device)
        loss, _, _ = model(imgs, mask, return_pred=False)
        return loss, len(imgs)

    watched = _Watch(monitor, trainer, log)
    if not trainer.resumed_from:
        watched.evaluate(0, None)  # the random initialisation: what learning is measured from
    for epoch in trainer.epochs(cfg.epochs):
        started = time.perf_counter()
        if not trainer.train_one_epoch(forward):
            break
        figures.epoch_end(epoch, trainer.pos.global_step)
        if monitor and monitor.due(epoch, cfg.epochs):
            watched.evaluate(epoch, time.perf_counter() - started)
        trainer.save_state()
    watched.final()
    return _finish(cfg, trainer, figures, facts)


class _Watch:
    """The monitor's calls from the loop (nothing when there is no monitor): at a position,
    and once more at the end when ``max_steps`` stopped the run between two evaluations."""

    def __init__(self, monitor: PretrainMonitor | None, trainer: T.Trainer, log: T.RunLog):
        self.monitor, self.trainer, self.log = monitor, trainer, log
        self.last_step: int | None = None

    def evaluate(self, epoch: int, epoch_s: float | None) -> None:
        if self.monitor is None:
            return
        step = self.trainer.pos.global_step
        self.monitor.evaluate(self.trainer.model.encoder, epoch, step, self.log, epoch_s,
                              say=self.trainer.say)
        self.last_step = step

    def final(self) -> None:
        pos = self.trainer.pos
        if self.monitor is not None and self.last_step != pos.global_step:
            self.evaluate(pos.epoch + (1 if pos.batches_done else 0), None)


class _Figures:
    """The loss curve and reconstruction grids (rank 0), also sent to TensorBoard."""

    def __init__(self, cfg: PretrainConfig, fcmae, info, out: Path, log: T.RunLog):
        self.cfg, self.fcmae, self.info, self.out, self.log = cfg, fcmae, info, out, log
        self.saver = _reconstruction_saver() if info.is_main else None
        self.batch = fixed_recon_batch(cfg, fcmae.patch_size) if self.saver else None
        self.mean_std = mean_std(cfg.in_chans)

    def epoch_end(self, epoch: int, step: int) -> None:
        if not self.info.is_main:
            return
        _plot_loss(self.out)
        every = self.cfg.recon_every
        if every and epoch % every == 0 and not self.cfg.fsdp:  # sharded: needs every rank
            self.reconstruction(self.fcmae, self.out / f"reconstruction_ep{epoch:04d}.png",
                                f"epoch {epoch}, step {step}", step)

    def reconstruction(self, fcmae, path: Path, caption: str, step: int) -> Path | None:
        if self.saver is None:
            return None
        _save_recon(self.saver, fcmae, self.batch, path, *self.mean_std, caption,
                    self.info.device)
        self.log.image("reconstruction", path, step)
        return path


def _finish(cfg: PretrainConfig, trainer: T.Trainer, figures: _Figures, facts: dict) -> dict:
    """The final files (loss curve, reconstruction, encoder and FCMAE weights) and the summary."""

    info, out, fcmae, pos = trainer.info, trainer.out, trainer.model, trainer.pos
    if cfg.fsdp:  # the files and figures come from one full copy on rank 0
        fcmae = fsdp.unsharded_copy(fcmae, lambda: build_fcmae(cfg), info.device, info.is_main)
    files = {}
    if info.is_main:
        files["loss_curve"] = _plot_loss(out)
        recon = figures.reconstruction(fcmae, out / "reconstruction.png",
                                       f"end: epoch {pos.epoch}, step {pos.global_step}",
                                       pos.global_step)
        if recon:
            files["reconstruction"] = recon
        meta = {"source": "convnextv2 pretrain (FCMAE)", "epochs": str(cfg.epochs),
                "global_step": str(pos.global_step), "data": describe_source(cfg.data),
                "img_size": str(cfg.img_size), "wd_exempt": cfg.wd_exempt,
                "freeze_encoder": str(cfg.freeze_encoder).lower()}
        files["encoder"] = save_encoder(fcmae.encoder, out / "encoder.safetensors", meta)
        files["fcmae"] = fcmae_io.save_fcmae(fcmae, out / "fcmae.safetensors", meta)
        files["checkpoint"] = trainer.last_checkpoint
        trainer.say(f"done: {pos.global_step} steps, last loss {trainer.last_loss:.4f}; "
                    f"wrote {out}")
    summary = dict(global_step=pos.global_step, epoch=pos.epoch, epochs=cfg.epochs,
                   last_loss=trainer.last_loss, **_loss_trend(out), files=files,
                   output=str(out), model=cfg.model, img_size=cfg.img_size,
                   data=describe_source(cfg.data), init=cfg.init,
                   freeze_encoder=cfg.freeze_encoder, config=trainer.args, **facts)
    trainer.write_json("summary.json", summary)
    T.barrier()
    return summary


def _loss_trend(out: Path) -> dict:
    """The mean loss of the run's first and last epochs (from metrics.jsonl, so a resumed run
    counts its earlier steps too): what a model card reports, steadier than one step's loss."""
    records = [r for r in T.read_metrics(out / "metrics.jsonl") if "loss" in r]  # steps only
    if not records:
        return {}
    first, last = records[0]["epoch"], records[-1]["epoch"]
    mean = lambda e: (sum(r["loss"] for r in records if r["epoch"] == e)  # noqa: E731
                      / sum(1 for r in records if r["epoch"] == e))
    return dict(first_epoch_loss=mean(first), last_epoch_loss=mean(last))


def _plot_loss(out: Path) -> Path | None:
    records = [r for r in T.read_metrics(out / "metrics.jsonl") if "loss" in r]
    smooth = 20 if len(records) >= 100 else 0
    return T.plot_curves(records, out / "loss_curve.png", keys=("loss",), x="step",
                         title="FCMAE pretraining loss", smooth=smooth)


def _save_recon(saver, fcmae, batch, path: Path, mean, std, caption: str, device) -> Path:
    imgs, mask = batch
    was_training = fcmae.training
    fcmae.eval()
    try:
        with torch.no_grad():
            saver(fcmae, imgs.to(device), mask.to(device), path, mean, std, caption=caption)
    finally:
        fcmae.train(was_training)
    return path
