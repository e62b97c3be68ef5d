"""Classifier evaluation, in one process or distributed so that every sample counts once.

``DistributedSampler`` pads the dataset to a multiple of the world size by repeating samples,
which would count those twice in the accuracy. Here rank r evaluates samples r, r + W, r + 2W,
... (an unpadded split: ranks may differ by one sample), and the per-rank sums (loss, hits,
confusion matrix, count) are added with one all-reduce before the ratios are taken.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from .distributed import DistInfo
from .step import autocast


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int | None = None,
             device: torch.device | str = "cpu", amp: str = "none",
             progress: bool = False, desc: str = "eval") -> dict:
    """Cross-entropy loss, top-1 and top-5 accuracy (percent), per-class accuracy and the
    confusion matrix (rows: true class, columns: predicted) over ``loader``'s batches.

    ``top5`` is top-min(5, classes). Batches may be ``(x, y)`` or ``(x, y, index)``.
    ``amp``: "none", "bf16" or "fp16" autocast (the training engine's modes).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_loss, n, correct1, correct5 = 0.0, 0, 0, 0
    confusion = None
    batches = loader
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for batch in batches:
        x, y = batch[0].to(device), batch[1].to(device)
        with autocast(device, amp or "none"):
            logits = model(x)
        logits = logits.float()
        c = logits.shape[1]
        if confusion is None:
            confusion = torch.zeros(num_classes or c, num_classes or c, dtype=torch.long)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, c), dim=1).indices
        hits = top == y[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += len(y)
        k = confusion.shape[0]
        idx = y.cpu() * k + top[:, 0].cpu()
        confusion += torch.bincount(idx, minlength=k * k).view(k, k)
    if was_training:
        model.train()
    if n == 0:
        raise ValueError("evaluation data is empty")
    support = confusion.sum(dim=1)
    per_class = (confusion.diag().float() / support.clamp(min=1) * 100).tolist()
    return dict(loss=total_loss / n, top1=100.0 * correct1 / n, top5=100.0 * correct5 / n,
                count=n, per_class_top1=[p if s > 0 else None for p, s in zip(per_class, support)],
                confusion=confusion.tolist())


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """This rank's samples of ``n``: every index on exactly one rank, no padding."""
    return list(range(info.rank, n, info.world_size))


def sharded_loader(dataset, info: DistInfo, **loader_kwargs) -> DataLoader:
    """A (non-shuffled) loader over this rank's unpadded share of ``dataset``."""
    part = dataset if not info.distributed else Subset(dataset,
                                                       shard_indices(len(dataset), info))
    return DataLoader(part, shuffle=False, **loader_kwargs)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def evaluate_distributed(model, loader, num_classes: int | None = None,
                         device: torch.device | str = "cpu", amp: str = "none",
                         progress: bool = False, desc: str = "eval") -> dict:
    """``evaluate`` over this rank's ``loader``, combined over all ranks: the same
    dict as a single-process evaluation of the whole dataset (``count`` = dataset size)."""
    if _world() == 1:
        return evaluate(model, loader, num_classes, device, amp, progress, desc)
    if num_classes is None:
        raise ValueError("distributed evaluation needs num_classes (the confusion size)")
    k = int(num_classes)
    empty = len(loader.dataset) == 0
    local = None if empty else evaluate(model, loader, k, device, amp, progress, desc)
    sums = torch.zeros(4 + k * k, dtype=torch.float64)
    if local is not None:
        n = local["count"]
        sums[0] = local["loss"] * n
        sums[1] = round(local["top1"] * n / 100)
        sums[2] = round(local["top5"] * n / 100)
        sums[3] = n
        sums[4:] = torch.tensor(local["confusion"], dtype=torch.float64).flatten()
    group_device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = sums.to(group_device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    sums = sums.cpu()
    n = int(sums[3])
    if n == 0:
        raise ValueError("evaluation data is empty")
    confusion = sums[4:].round().long().view(k, k)
    support = confusion.sum(dim=1)
    per_class = (confusion.diag().double() / support.clamp(min=1) * 100).tolist()
    return dict(loss=float(sums[0]) / n, top1=100.0 * float(sums[1]) / n,
                top5=100.0 * float(sums[2]) / n, count=n,
                per_class_top1=[p if s > 0 else None for p, s in zip(per_class, support)],
                confusion=confusion.tolist())
