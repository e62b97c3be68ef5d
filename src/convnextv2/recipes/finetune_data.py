"""The data side of fine-tuning: transforms, loaders, and mixup/cutmix keyed by the step.

Reproducibility, as in pretraining: the sample order is a function of (seed, epoch), each
image's augmentation of (seed, epoch, sample index) (``KeyedAugmentDataset``), and mixup/cutmix
draws of (seed, optimizer step, micro-batch) (``keyed_mixup`` reseeds the global RNGs timm's
``Mixup`` reads for the call and restores them after). A run resumed mid-epoch therefore
repeats the uninterrupted run's per-step losses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset

from .. import training as T
from ..data import build_dataset, count_skipped, eval_transform, train_transform
from ..data.shards import ShardLoader, is_shard_source, open_shards
from ..training import sample_key
from ..data.keyed_random import keyed_rngs
from ..training.dist_eval import sharded_loader
from .finetune_config import FinetuneConfig


def build_transforms(run: FinetuneConfig, in_chans: int) -> tuple:
    """The training and evaluation transforms of the resolved config ``run``; a policy timm
    does not parse is refused here, before the run writes anything."""
    try:
        train_tf = train_transform(
            run.img_size, in_chans, auto_augment=run.auto_augment, reprob=run.reprob,
            remode=run.remode, recount=run.recount, scale=tuple(run.crop_scale),
            color_jitter=run.color_jitter, interpolation=run.train_interpolation)
    except Exception as e:  # timm's parsers raise assorted errors for a bad policy string
        raise ValueError(f"--aa {run.auto_augment!r} / --train-interpolation "
                         f"{run.train_interpolation!r}: not accepted by timm ({e}); use a "
                         f"RandAugment policy such as rand-m9-mstd0.5-inc1, or none") from None
    return train_tf, eval_transform(run.img_size, in_chans, crop_pct=run.crop_pct)


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


def build_data(run: FinetuneConfig, transforms: tuple, info: T.DistInfo) -> FinetuneData:
    """The training and validation loaders and the mixup/cutmix function of the run."""
    batch = run.batch_size
    if is_shard_source(run.data):
        return _shard_data(run, transforms, info)
    train_ds = build_dataset(run.data, "train", transforms[0], strict=run.strict_data,
                             labelled=True)
    val_ds = build_dataset(run.data, "val", transforms[1], strict=run.strict_data,
                           labelled=True)
    classes = list(train_ds.classes)
    if val_ds.classes != classes:
        raise ValueError(f"{run.data}: the train and val splits have different classes "
                         f"({len(classes)} vs {len(val_ds.classes)})")
    skipped = train_ds.num_skipped + val_ds.num_skipped
    train_ds = _subset(train_ds, run.train_subset, run.seed)
    val_ds = _subset(val_ds, run.val_subset, run.seed + 1)
    mixup_active = run.mixup > 0 or run.cutmix > 0 or run.cutmix_minmax is not None
    if mixup_active and len(train_ds) < batch * info.world_size:
        raise ValueError(f"mixup/cutmix need full batches: {len(train_ds)} training images < "
                         f"--batch-size {batch} x {info.world_size} processes")
    keyed = T.KeyedAugmentDataset(train_ds, run.seed)
    sampler = T.ResumableSampler(T.build_sampler(keyed, info, shuffle=True, seed=run.seed))
    loader = DataLoader(keyed, batch_size=batch, sampler=sampler, drop_last=mixup_active,
                        num_workers=run.workers, worker_init_fn=T.worker_init,
                        generator=torch.Generator().manual_seed(run.seed),
                        persistent_workers=False)  # workers must see each set_epoch
    # each rank scores an unpadded share of the validation set; evaluate() sums over ranks.
    # Sharded (FSDP) weights are gathered into one copy that rank 0 scores on the whole set.
    val_batch = max(2 * batch, 64)
    val_loader = sharded_loader(val_ds, info, batch_size=val_batch, num_workers=run.workers)
    if run.fsdp and info.distributed:
        val_loader = DataLoader(val_ds, batch_size=val_batch, shuffle=False,
                                num_workers=run.workers)
    batches = _batches_per_epoch(run, len(loader), len(train_ds))
    return FinetuneData(loader, val_loader, classes, skipped, batches,
                        _mixup(run, len(classes)), (train_ds, val_ds))


def _mixup(run: FinetuneConfig, num_classes: int):
    """timm's ``Mixup`` of the run, None when mixup and cutmix are off."""
    from timm.data import Mixup

    if not (run.mixup > 0 or run.cutmix > 0 or run.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=run.mixup, cutmix_alpha=run.cutmix,
                 cutmix_minmax=run.cutmix_minmax, prob=run.mixup_prob,
                 switch_prob=run.mixup_switch_prob, mode=run.mixup_mode,
                 label_smoothing=run.smoothing, num_classes=num_classes)


def _shard_data(run: FinetuneConfig, transforms: tuple, info: T.DistInfo) -> FinetuneData:
    """Training and validation from tar shards (``data.shards``): a folder with ``train/``
    and ``val/`` shard folders. Training streams every process's endless share (always whole
    batches, so mixup needs no check); each process scores its own val shards (FSDP: rank 0
    scores them all), every image once."""
    if run.train_subset or run.val_subset:
        raise ValueError(f"--train-subset / --val-subset draw images from a list; --data "
                         f"{run.data} is streamed tar shards: write a smaller shard set instead")
    train_ds = open_shards(run.data, "train", transforms[0], strict=run.strict_data,
                           labelled=True, with_index=False)
    val_ds = open_shards(run.data, "val", transforms[1], strict=run.strict_data,
                         labelled=True, with_index=False)
    if val_ds.classes != train_ds.classes:
        raise ValueError(f"{run.data}: the train and val shards have different classes "
                         f"({len(train_ds.classes)} vs {len(val_ds.classes)})")
    train_ds.for_training(seed=run.seed, rank=info.rank, world_size=info.world_size,
                          workers=run.workers, batch_size=run.batch_size)
    whole = run.fsdp and info.distributed
    val_ds.for_evaluation(rank=0 if whole else info.rank, world_size=1 if whole else
                          info.world_size)
    val_loader = DataLoader(val_ds, batch_size=max(2 * run.batch_size, 64),
                            num_workers=min(run.workers, len(val_ds.shards)))
    loader = ShardLoader(train_ds)
    batches = _batches_per_epoch(run, len(loader), len(train_ds))
    return FinetuneData(loader, val_loader, list(train_ds.classes), 0, batches,
                        _mixup(run, len(train_ds.classes)), (train_ds, val_ds))


def _batches_per_epoch(run: FinetuneConfig, batches: int, images: int) -> int:
    """The loader's batches, capped by ``max_steps_per_epoch``, cut to whole accumulations
    (no half-accumulated step at an epoch's end)."""
    if run.max_steps_per_epoch:
        batches = min(batches, run.max_steps_per_epoch * run.accum_steps)
    if batches < run.accum_steps:
        raise ValueError(f"too few training batches ({batches}) for --accum-steps "
                         f"{run.accum_steps}: {images} images, batch {run.batch_size}")
    return batches - batches % run.accum_steps


def keyed_mixup(mixup_fn, x, y, seed: int, step: int, micro: int = 0):
    """timm's ``Mixup`` with its draws (lambda, mixup-or-cutmix, box) keyed by (seed,
    optimizer step, micro-batch): the global RNGs it reads are reseeded from that key for the
    call and restored afterwards. Every rank draws the same lambda for a step, as one process
    holding the whole global batch would."""
    with keyed_rngs(sample_key(seed, step, micro, salt="mixup")):
        return mixup_fn(x, y)
