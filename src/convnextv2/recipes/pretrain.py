"""FCMAE pretraining loop (official recipe of SPEC section 3 as defaults).

``pretrain(PretrainConfig(...))`` runs the job and returns a summary; ``convnextv2 pretrain``
is its command line. Everything generic (schedule, checkpoints, metrics, distributed setup,
mixed precision) comes from ``convnextv2.training``; this module only wires FCMAE to it.

Written under ``output``:
  metrics.jsonl                one JSON line per optimizer step (step, epoch, loss, lr, img_per_s)
  checkpoint-<step>.pt         run state after each epoch (and every ``save_every_steps``)
  loss_curve.png               loss against step, redrawn every epoch and at the end
  reconstruction_epNNNN.png    fixed images / fixed mask every ``recon_every`` epochs
  reconstruction.png           the same at the end
  encoder.safetensors          the encoder, native layout (``create_model(name, pretrained=...)``)
  fcmae.safetensors            encoder + decoder (``load_fcmae``)

Reproducibility: the sample order is a function of (seed, epoch), each image's augmentation
and mask a function of (seed, epoch, sample index), so results do not depend on the number
of processes or data-loader workers, and a run resumed mid-epoch continues with exactly the
batches, masks and losses of the uninterrupted run (bit for bit with ``deterministic``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import training as T
from ..fcmae import io as fcmae_io

# SPEC section 3 (pretraining)
RECIPE = dict(blr=1.5e-4, min_lr=0.0, warmup_epochs=40, weight_decay=0.05, betas=(0.9, 0.95),
              mask_ratio=0.6, epochs=800, norm_pix_loss=True, decoder_depth=1,
              decoder_embed_dim=512)
RECON_IMAGES = 8
RECON_EPOCH_KEY = -1  # the reconstruction mask's "epoch": fixed, unlike every training epoch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stopped before the optimizer applied it."""

    def __init__(self, step: int, epoch: int, value: float, checkpoint: Path | None):
        self.step, self.epoch, self.value, self.checkpoint = step, epoch, value, checkpoint
        kept = (f"the last good checkpoint is {checkpoint}" if checkpoint
                else "no checkpoint had been written yet")
        super().__init__(f"non-finite loss ({value}) at optimizer step {step} (epoch {epoch}); "
                         f"stopped without applying it; {kept}. Lower --blr/--lr, lengthen "
                         f"--warmup-epochs, or try --amp none.")


@dataclass
class PretrainConfig:
    """Options of a pretraining run; ``None`` means "the recipe's value" where noted."""
    model: str = "convnextv2_atto"
    data: str = "builtin"
    output: str = "runs/fcmae"
    epochs: int = RECIPE["epochs"]
    batch_size: int = 64                 # per process and micro-batch
    accum_steps: int = 1
    img_size: int = 224
    in_chans: int = 3
    stem_stride: int | None = None       # None: the model's (4)
    depths: Sequence[int] | None = None  # custom encoder shape (tests, small studies)
    dims: Sequence[int] | None = None
    v1_block: bool = False               # ConvNeXt V1 block (no GRN, layer scale) for ablations
    mask_ratio: float = RECIPE["mask_ratio"]
    norm_pix_loss: bool = RECIPE["norm_pix_loss"]
    decoder_depth: int = RECIPE["decoder_depth"]
    decoder_dim: int = RECIPE["decoder_embed_dim"]
    backend: str = "sparse"
    blr: float = RECIPE["blr"]
    lr: float | None = None              # None: blr * effective batch / 256
    min_lr: float = RECIPE["min_lr"]
    warmup_epochs: float | None = None   # None: the recipe's 40, capped at a quarter of the run
    weight_decay: float = RECIPE["weight_decay"]
    betas: Sequence[float] = RECIPE["betas"]
    clip_grad: float | None = None
    amp: str = "none"
    device: str | None = None            # None/"auto": GPU when there is one
    workers: int = 2
    seed: int = 0
    deterministic: bool = False
    resume: str | None = None            # "auto", a checkpoint file or a run folder
    save_every_steps: int = 0
    keep_last: int = 3
    recon_every: int = 10
    max_steps: int | None = None         # stop after this many optimizer steps in total
    progress: bool = True
    strict_data: bool = False            # unreadable images are fatal instead of skipped
    fsdp: bool = False                   # shard with FSDP2 (fully_shard) instead of DDP


# -- setup helpers ---------------------------------------------------------------------------
def check_output_writable(output: str | Path) -> Path:
    """Create ``output`` and prove a file can be written there, before any real work."""
    out = Path(output).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"--output {output}: cannot write there ({e.strerror or e}); "
                              f"pick a folder you can write to") from None
    return out


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


def _worker_init(worker_id: int) -> None:
    """Seed numpy/python in loader workers from torch's per-worker seed (itself derived from
    the loader's seeded generator). Augmentation is keyed per sample on top of this."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def build_fcmae(cfg: PretrainConfig):
    from ..models.registry import block_kwargs
    from ..fcmae.fcmae import FCMAE
    from ..models.registry import create_model

    encoder = create_model(cfg.model, num_classes=0, in_chans=cfg.in_chans,
                           stem_stride=cfg.stem_stride,
                           depths=tuple(cfg.depths) if cfg.depths else None,
                           dims=tuple(cfg.dims) if cfg.dims else None,
                           **block_kwargs(cfg.v1_block))
    fcmae = FCMAE(encoder, mask_ratio=cfg.mask_ratio, decoder_depth=cfg.decoder_depth,
                  decoder_embed_dim=cfg.decoder_dim, norm_pix_loss=cfg.norm_pix_loss,
                  backend=cfg.backend)
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


def _check_config(cfg: PretrainConfig) -> None:
    for name in ("epochs", "batch_size", "accum_steps", "img_size", "in_chans", "keep_last"):
        if getattr(cfg, name) < (0 if name == "keep_last" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, "
                             f"got {getattr(cfg, name)}")
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {cfg.mask_ratio}")
    if cfg.backend not in ("sparse", "dense"):
        raise ValueError(f"--backend must be sparse or dense, got {cfg.backend!r}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {cfg.max_steps}")
    if cfg.save_every_steps < 0 or cfg.recon_every < 0 or cfg.workers < 0:
        raise ValueError("--save-every-steps, --recon-every and --workers must be >= 0")


def resolve_warmup(cfg: PretrainConfig) -> tuple[float, str | None]:
    """Warmup epochs to use and a note when the recipe's 40 was shortened for a short run."""
    if cfg.warmup_epochs is not None:
        return min(float(cfg.warmup_epochs), float(cfg.epochs)), None
    warmup = T.clip_warmup_epochs(RECIPE["warmup_epochs"], cfg.epochs)
    note = None
    if warmup < RECIPE["warmup_epochs"]:
        note = (f"warmup: the recipe's {RECIPE['warmup_epochs']} epochs exceed a quarter of this "
                f"{cfg.epochs}-epoch run; using {warmup:g} (set --warmup-epochs to override)")
    return warmup, note


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
    from ..checkpoint import save_checkpoint

    weights = _EncoderWeights(encoder)
    save_checkpoint(weights, path, layout="native", metadata=metadata)
    return path


def _reconstruction_saver():
    """``save_reconstruction_grid`` from the analysis package, or None if not installed."""
    try:
        from ..analysis.reconstruction import save_reconstruction_grid
    except ImportError:
        return None
    return save_reconstruction_grid


def fixed_recon_batch(cfg: PretrainConfig, patch_size: int):
    """The same first images (deterministic resize, no random crop) and the same mask for
    every reconstruction figure of a run."""
    from ..data import build_dataset, eval_transform
    from ..fcmae.masking import keyed_mask

    ds = build_dataset(cfg.data, "train", eval_transform(cfg.img_size, cfg.in_chans, crop_pct=1.0))
    n = min(RECON_IMAGES, len(ds))
    imgs = torch.stack([ds[i][0] for i in range(n)])
    grid = (cfg.img_size // patch_size,) * 2
    mask = keyed_mask(cfg.seed, RECON_EPOCH_KEY, range(n), grid, cfg.mask_ratio)
    return imgs, mask


def build_loader(cfg: PretrainConfig, info: T.DistInfo):
    """The training data: order keyed by (seed, epoch), augmentation by (seed, epoch, index).

    Returns ``(dataset, keyed, sampler, loader)``: call ``keyed.set_epoch`` and
    ``sampler.set_epoch(epoch, skip)`` before iterating ``loader`` for an epoch; batches are
    ``(images, targets, indices)``.
    """
    from torch.utils.data import DataLoader

    from ..data import IndexedDataset, build_dataset, pretrain_transform

    base = build_dataset(cfg.data, "train", pretrain_transform(cfg.img_size, cfg.in_chans),
                         strict=cfg.strict_data)
    keyed = T.KeyedAugmentDataset(base, cfg.seed)
    dataset = IndexedDataset(keyed)
    sampler = T.ResumableSampler(T.build_sampler(dataset, info, shuffle=True, seed=cfg.seed))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=cfg.workers, drop_last=True,
                        pin_memory=info.device.type == "cuda", worker_init_fn=_worker_init,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        persistent_workers=False)  # workers must see each epoch's set_epoch
    return base, keyed, sampler, loader


# -- the loop --------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig) -> dict:
    """Run FCMAE pretraining; returns a summary dict (steps, last loss, written files)."""
    _check_config(cfg)
    info = T.init_distributed(cfg.device)
    T.check_amp(cfg.amp, info.device)
    out = check_output_writable(cfg.output) if info.is_main else Path(cfg.output)
    T.barrier()
    previous_det = set_deterministic(cfg.deterministic)
    try:
        return _pretrain(cfg, info, out)
    finally:
        set_deterministic(previous_det)
        T.cleanup_distributed()


def _log(info, *parts) -> None:
    if info.is_main:
        print(*parts, flush=True)


def _pretrain(cfg: PretrainConfig, info: T.DistInfo, out: Path) -> dict:
    from ..data import describe_source, mean_std
    from ..fcmae.masking import keyed_mask

    seed_everything(cfg.seed, info.rank)
    base, keyed, sampler, loader = build_loader(cfg, info)
    steps_per_epoch = len(loader) // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"{describe_source(cfg.data)} has {len(base)} images: too few for one "
                         f"optimizer step of {cfg.batch_size} x {cfg.accum_steps} (accum) x "
                         f"{info.world_size} (processes); lower --batch-size or --accum-steps")
    batches_per_epoch = steps_per_epoch * cfg.accum_steps  # a partial accumulation is dropped

    # model, optimizer, schedule (recipe: AdamW (0.9, 0.95), lr = blr * eff / 256, cosine)
    fcmae = build_fcmae(cfg).to(info.device)
    if cfg.fsdp:  # before the optimizer: sharding replaces the parameters
        from ..training import fsdp
        fsdp.shard(fcmae, info)
    eff = T.effective_batch(cfg.batch_size, cfg.accum_steps, info.world_size)
    base_lr = cfg.lr if cfg.lr is not None else T.scaled_lr(cfg.blr, eff)
    optimizer = torch.optim.AdamW(T.param_groups(fcmae, cfg.weight_decay), lr=base_lr,
                                  betas=tuple(cfg.betas))
    warmup, warmup_note = resolve_warmup(cfg)
    schedule = T.WarmupCosineSchedule(optimizer, base_lr=base_lr, epochs=cfg.epochs,
                                      steps_per_epoch=steps_per_epoch, warmup_epochs=warmup,
                                      min_lr=cfg.min_lr)
    stepper = T.AccumulatingStep(fcmae, optimizer, accum_steps=cfg.accum_steps, amp=cfg.amp,
                                 device=info.device, clip_grad=cfg.clip_grad)

    # resume
    args = dataclasses.asdict(cfg)
    epoch, batches_done, global_step = 0, 0, 0
    resume_path = T.broadcast_object(T.resolve_resume(cfg.resume, out) if info.is_main else None)
    last_ckpt = resume_path
    if resume_path is not None:
        state = T.load_run_state(resume_path)
        _warn_changed_args(info, state.get("args", {}), args)
        saved_world = state.get("extra", {}).get("world_size", info.world_size)
        if saved_world != info.world_size:
            _log(info, f"warning: the checkpoint was written by {saved_world} process(es), this "
                       f"run has {info.world_size}; the effective batch and data split change")
        try:
            apply = fsdp.apply_run_state if cfg.fsdp else T.apply_run_state
            pos = apply(state, model=fcmae, optimizer=optimizer, scaler=stepper.scaler)
        except RuntimeError as e:
            raise ValueError(f"--resume {resume_path}: its weights do not fit this model "
                             f"({str(e).splitlines()[0]}); resume with the same --model and "
                             f"shape options") from None
        epoch, batches_done, global_step = pos["epoch"], pos["batches_done"], pos["global_step"]
        if batches_done >= batches_per_epoch:
            epoch, batches_done = epoch + 1, 0
        _log(info, f"resumed from {resume_path}: epoch {epoch}, step {global_step}")
    elif cfg.resume == "auto":
        _log(info, f"--resume auto: no checkpoint in {out}, starting fresh")

    model = fcmae if cfg.fsdp else T.wrap_ddp(fcmae, info)
    metrics = T.MetricsLog(out / "metrics.jsonl", resume_step=global_step if resume_path else None,
                           enabled=info.is_main)
    recon_saver = _reconstruction_saver() if info.is_main else None
    recon_batch = fixed_recon_batch(cfg, fcmae.patch_size) if recon_saver else None
    grid = (cfg.img_size // fcmae.patch_size,) * 2
    mean, std = mean_std(cfg.in_chans)

    total_steps = cfg.epochs * steps_per_epoch
    stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    n_params = sum(p.numel() for p in fcmae.encoder.parameters()) / 1e6
    _log(info, f"FCMAE pretraining: {cfg.model} ({n_params:.2f}M encoder params, patch "
               f"{fcmae.patch_size}, {cfg.backend} backend) on "
               f"{describe_source(cfg.data)}: {len(base)} images, {steps_per_epoch} steps/epoch, "
               f"effective batch {eff}, lr {base_lr:.3g}, device {info.device}"
               + (f", {info.world_size} processes" if info.distributed else ""))
    if warmup_note:
        _log(info, warmup_note)
    if getattr(base, "num_skipped", 0):
        _log(info, f"skipped {base.num_skipped} unreadable image(s)")
    if recon_saver is None and info.is_main:
        _log(info, "note: convnextv2.analysis.reconstruction is not available; "
                   "no reconstruction figures")

    def save_state(ep: int, done: int) -> Path | None:
        nonlocal last_ckpt
        src_model, src_optim = (fsdp.full_state_views(fcmae, optimizer) if cfg.fsdp
                                else (fcmae, optimizer))  # FSDP: gathered on every rank
        if info.is_main:
            state = T.build_run_state(model=src_model, optimizer=src_optim, epoch=ep,
                                      batches_done=done, global_step=global_step, args=args,
                                      scaler=stepper.scaler,
                                      data_order=dict(seed=cfg.seed, kind="distributed-sampler"),
                                      extra=dict(world_size=info.world_size))
            last_ckpt = T.save_run_state(out, state, keep_last=cfg.keep_last)
        T.barrier()
        return last_ckpt

    pbar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=stop_at, initial=min(global_step, stop_at), desc="pretrain",
                    unit="step", dynamic_ncols=True)
    last_loss = float("nan")
    throughput = T.Throughput()
    model.train()
    try:
        while epoch < cfg.epochs and global_step < stop_at:
            sampler.set_epoch(epoch, skip=batches_done * cfg.batch_size)
            keyed.set_epoch(epoch)
            batches = iter(loader)
            step_losses = []
            throughput.reset()
            for b in range(batches_done, batches_per_epoch):
                imgs, _, index = next(batches)
                imgs = imgs.to(info.device, non_blocking=True)
                mask = keyed_mask(cfg.seed, epoch, index, grid, cfg.mask_ratio, device=info.device)
                if stepper.micro == 0:
                    lr = schedule.step(global_step)
                with stepper.micro_batch():
                    loss, _, _ = model(imgs, mask)
                value = float(T.all_reduce_mean(loss.detach().float()))
                if not math.isfinite(value):
                    raise NonFiniteLossError(global_step + 1, epoch, value, last_ckpt)
                step_losses.append(value)
                if not stepper.backward(loss):
                    continue
                global_step += 1
                last_loss = sum(step_losses) / len(step_losses)
                step_losses = []
                record = dict(step=global_step, epoch=epoch, loss=last_loss, lr=lr,
                              img_per_s=throughput.rate(eff),
                              skipped_images=getattr(base, "num_skipped", 0))
                metrics.log(record)
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix(epoch=epoch, loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                                     img_s=f"{record['img_per_s']:.0f}")
                done = b + 1
                if global_step >= stop_at and done < batches_per_epoch:
                    batches_done = done
                    break
                if cfg.save_every_steps and global_step % cfg.save_every_steps == 0 \
                        and done < batches_per_epoch:
                    save_state(epoch, done)
            else:  # the epoch ran to its end
                epoch, batches_done = epoch + 1, 0
                save_state(epoch, 0)
                if info.is_main:
                    _plot_loss(out)
                    if recon_saver and cfg.recon_every and epoch % cfg.recon_every == 0 \
                            and not cfg.fsdp:  # a sharded forward needs every rank
                        _save_recon(recon_saver, fcmae, recon_batch,
                                    out / f"reconstruction_ep{epoch:04d}.png", mean, std,
                                    f"epoch {epoch}, step {global_step}", info.device)
                continue
            save_state(epoch, batches_done)  # stopped by --max-steps inside the epoch
            break
    except NonFiniteLossError as e:
        _log(info, f"stopping: {e}")
        metrics.close()
        raise
    finally:
        if pbar is not None:
            pbar.close()
    metrics.close()

    if cfg.fsdp:  # the files and figures come from one full copy on rank 0
        fcmae = fsdp.unsharded_copy(fcmae, lambda: build_fcmae(cfg), info.device, info.is_main)
    files = {}
    if info.is_main:
        files["loss_curve"] = _plot_loss(out)
        if recon_saver:
            files["reconstruction"] = _save_recon(
                recon_saver, fcmae, recon_batch, out / "reconstruction.png", mean, std,
                f"end: epoch {epoch}, step {global_step}", info.device)
        meta = {"source": "convnextv2 pretrain (FCMAE)", "epochs": str(cfg.epochs),
                "global_step": str(global_step), "data": describe_source(cfg.data),
                "img_size": str(cfg.img_size)}
        files["encoder"] = save_encoder(fcmae.encoder, out / "encoder.safetensors", meta)
        files["fcmae"] = fcmae_io.save_fcmae(fcmae, out / "fcmae.safetensors", meta)
        files["checkpoint"] = last_ckpt
        _log(info, f"done: {global_step} steps, last loss {last_loss:.4f}; wrote {out}")
    T.barrier()
    return dict(global_step=global_step, epoch=epoch, last_loss=last_loss, lr=base_lr,
                effective_batch=eff, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup,
                files=files, output=str(out))


def _plot_loss(out: Path) -> Path | None:
    records = T.read_metrics(out / "metrics.jsonl")
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


_RESUME_MUST_MATCH = ("model", "img_size", "in_chans", "stem_stride", "depths", "dims",
                      "batch_size", "accum_steps", "epochs", "seed", "mask_ratio", "data")


def _warn_changed_args(info, saved: dict, now: dict) -> None:
    """An exact continuation needs the same run shape; say which options changed."""
    changed = [k for k in _RESUME_MUST_MATCH
               if k in saved and T.runstate.plain(now.get(k)) != saved[k]]
    if changed:
        _log(info, "warning: resuming with changed " + ", ".join(
            f"{k} ({saved[k]} -> {T.runstate.plain(now.get(k))})" for k in changed)
            + "; the run will not match an uninterrupted one")
