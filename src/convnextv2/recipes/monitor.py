"""Watching a pretraining run learn: k-NN accuracy and feature collapse, every N epochs.

Reconstruction loss does not say whether the encoder is learning features that fine-tune
well. ``pretrain --monitor-data DIR`` adds two probes that do, run on the dense encoder in
eval mode at the start (the random initialisation, on a fresh run) and every
``--monitor-every`` epochs:

- k-NN top-1/top-5 (``analysis/knn.py``: k = 20, cosine, ``exp(cos / 0.07)`` votes, as in
  DINO's evaluation) of the pooled features: the labelled folder's ``val`` images (queries)
  against its ``train`` images (the bank); a folder without a split is split 80/20 with the
  run's seed. ``--monitor-images N`` caps each side at N images (a seeded choice);
- the feature-collapse score (``analysis/collapse.py``, the paper's measure: the average
  pairwise cosine distance of the channels) of every block, averaged per stage, on the first
  ``COLLAPSE_IMAGES`` query images: the same images, and so the same numbers, as
  ``convnextv2 analyze collapse --data DIR --split val --images 64 --seed SEED`` on the
  encoder's checkpoint.

Under torchrun each process embeds its share of the images (every image once); the bank is
gathered, each process scores its queries, and the hits and collapse sums are added. A
record ``{"step", "epoch", "knn_top1", "knn_top5", "collapse_stage1".., "collapse_mean",
"monitor_s", "monitor_fraction"}`` goes to ``metrics.jsonl`` and TensorBoard (``monitor/``),
``monitor.png`` is redrawn, and the log says what the evaluation cost, in seconds and as a
fraction of the epoch it followed. Its cost is bounded by its image count: about ``2N + 64``
dense forward passes, against the epoch's forward and backward passes over the whole dataset.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ..analysis.collapse import block_names, collapse_profile, sample_images
from ..analysis.knn import K, TEMPERATURE, knn_hits, knn_predict, pooled_features
from ..training import distributed as D
from ..training.dist_eval import shard_indices

COLLAPSE_IMAGES = 64  # analyze collapse's default --images
HOLDOUT_FRACTION = 0.2


@dataclass
class MonitorData:
    """The probe's images: the bank and the queries (index lists into their datasets)."""
    bank: object
    bank_index: list[int]
    queries: object
    query_index: list[int]
    num_classes: int
    collapse_images: torch.Tensor  # the first COLLAPSE_IMAGES query images, eval transform
    split: str                     # "train/val" or "80/20 split of train"


def open_monitor_data(source: str, img_size: int, in_chans: int, cap: int,
                      seed: int) -> MonitorData:
    """Read the labelled folder (before the run writes anything: a bad one is a one-line
    error) and choose the images, identically on every process."""
    from ..data import build_dataset, eval_transform

    transform = eval_transform(img_size, in_chans)
    try:
        bank = build_dataset(source, "train", transform)
    except (ValueError, OSError) as e:
        raise ValueError(f"--monitor-data {source}: {e}") from None
    classes = getattr(bank, "classes", None) or []
    if len(classes) < 2:
        raise ValueError(f"--monitor-data {source}: the k-NN probe needs labelled images of "
                         f"at least 2 classes (an ImageFolder: root/<class>/<image>), found "
                         f"{len(classes)}")
    gen = torch.Generator().manual_seed(seed)
    queries, split = _val_split(source, transform)
    if queries is None:  # no val split: hold out a fifth of the train images
        order = torch.randperm(len(bank), generator=gen).tolist()
        cut = max(1, int(len(order) * HOLDOUT_FRACTION))
        query_index, bank_index, queries = order[:cut], order[cut:], bank
        split = f"{int(HOLDOUT_FRACTION * 100)}% of the images held out as queries"
    else:
        query_index = torch.randperm(len(queries), generator=gen).tolist()
        bank_index = torch.randperm(len(bank), generator=gen).tolist()
    if not bank_index:
        raise ValueError(f"--monitor-data {source}: too few images for a k-NN bank")
    collapse = (sample_images(source, min(COLLAPSE_IMAGES, len(queries)), img_size, in_chans,
                              "val", seed) if split == "train/val" else
                torch.stack([queries[i][0] for i in query_index[:COLLAPSE_IMAGES]]))
    return MonitorData(bank, sorted(bank_index[:cap]), queries, sorted(query_index[:cap]),
                       len(classes), collapse, split)


def _val_split(source: str, transform):
    """The folder's own val split, or (None, "") when it has none (a class-folder root, whose
    "val" is its train images again)."""
    from ..data import build_dataset

    try:
        queries = build_dataset(source, "val", transform)
        train = build_dataset(source, "train")
    except (ValueError, OSError):
        return None, ""
    same = (getattr(queries, "samples", None) is not None
            and getattr(queries, "samples", None) == getattr(train, "samples", None))
    return (None, "") if same else (queries, "train/val")


class PretrainMonitor:
    """Runs the two probes on ``fcmae.encoder`` and records them (see the module docstring)."""

    def __init__(self, data: MonitorData, every: int, info: D.DistInfo, out: Path, amp: str,
                 batch_size: int, workers: int):
        self.data, self.every, self.info, self.out = data, every, info, out
        self.amp, self.batch_size, self.workers = amp, batch_size, workers
        self.history: list[dict] = []

    def due(self, epoch: int, last_epoch: int) -> bool:
        return epoch == 0 or epoch % self.every == 0 or epoch == last_epoch

    def evaluate(self, encoder, epoch: int, step: int, log, epoch_s: float | None,
                 say=print) -> dict:
        """Both probes now; the record is logged (rank 0) and returned (every rank)."""
        start = time.perf_counter()
        top1, top5, n = self._knn(encoder)
        stages = self._collapse(encoder)
        took = time.perf_counter() - start
        record = dict(step=step, epoch=epoch, knn_top1=100.0 * top1 / n,
                      knn_top5=100.0 * top5 / n, knn_queries=n,
                      **{f"collapse_stage{i + 1}": s for i, s in enumerate(stages)},
                      collapse_mean=sum(stages) / len(stages), monitor_s=took)
        if epoch_s:
            record["monitor_fraction"] = took / epoch_s
        self.history.append(record)
        if self.info.is_main:
            log.record("monitor", record)
            plot_monitor(self.history, self.out / "monitor.png")
            log.image("monitor", self.out / "monitor.png", step)
            cost = (f"{took:.1f} s = {100 * took / epoch_s:.1f}% of the epoch" if epoch_s
                    else f"{took:.1f} s")
            say(f"monitor (epoch {epoch}): k-NN top-1 {record['knn_top1']:.2f}% (k={K}, "
                f"{n} queries), collapse per stage "
                + " ".join(f"{s:.3f}" for s in stages) + f"; overhead {cost}")
        return record

    # -- the probes ------------------------------------------------------------------------------
    def _loader(self, dataset, index: list[int]) -> DataLoader:
        mine = [index[i] for i in shard_indices(len(index), self.info)]
        return DataLoader(Subset(dataset, mine), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.workers,  # its own generator: the training RNG
                          generator=torch.Generator().manual_seed(0))  # stays untouched

    def _knn(self, encoder) -> tuple[int, int, int]:
        d, device = self.data, self.info.device
        bank, bank_labels = pooled_features(encoder, self._loader(d.bank, d.bank_index), device,
                                            self.amp)
        queries, labels = pooled_features(encoder, self._loader(d.queries, d.query_index),
                                          device, self.amp)
        if self.info.distributed:  # every process needs the whole bank
            parts = [None] * self.info.world_size
            torch.distributed.all_gather_object(parts, (bank, bank_labels))
            bank = torch.cat([p[0] for p in parts if len(p[0])])
            bank_labels = torch.cat([p[1] for p in parts if len(p[1])])
        top1, top5 = (knn_hits(knn_predict(bank, bank_labels, queries, d.num_classes, K,
                                           TEMPERATURE), labels) if len(queries) else (0, 0))
        sums = _summed([top1, top5, len(labels)], device)
        return int(sums[0]), int(sums[1]), int(sums[2])

    def _collapse(self, encoder) -> list[float]:
        """Per-stage means of the per-block scores, over this process's share of the images,
        combined weighted by image count."""
        images = self.data.collapse_images
        mine = images[shard_indices(len(images), self.info)]
        names = block_names(encoder)
        scores = [0.0] * len(names)
        if len(mine):
            profile = collapse_profile(encoder, mine, batch_size=self.batch_size)
            scores = [s * len(mine) for s in profile["scores"]]
        per_block = (_summed(scores, self.info.device) / len(images)).tolist()
        return stage_means(names, per_block)


def stage_means(names: list[str], scores: list[float]) -> list[float]:
    """Mean score of each stage's blocks (names ``stages.<i>.blocks.<j>``), in stage order."""
    by_stage: dict[int, list[float]] = {}
    for name, score in zip(names, scores):
        by_stage.setdefault(int(name.split(".")[1]), []).append(score)
    return [sum(v) / len(v) for _, v in sorted(by_stage.items())]


def _summed(values: list[float], device: torch.device) -> torch.Tensor:
    """``values`` added over the processes (float64, on the CPU; as given in a world of
    one). The tensor travels on the GPU under NCCL."""
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        where = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
        total = total.to(where)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()


def plot_monitor(history: list[dict], path: Path) -> Path | None:
    """k-NN top-1 and the per-stage collapse scores against the epoch, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return None
    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(epochs, [r["knn_top1"] for r in history], marker="o", label="top-1")
    left.plot(epochs, [r["knn_top5"] for r in history], marker=".", alpha=0.6, label="top-5")
    left.set(xlabel="epoch (0: initialisation)", ylabel="k-NN accuracy (%)",
             title=f"k-NN (k={K}, T={TEMPERATURE}) on held-out labels")
    stages = sorted(k for k in history[0] if k.startswith("collapse_stage"))
    for key in stages:
        right.plot(epochs, [r[key] for r in history], marker="o",
                   label=key.replace("collapse_", ""))
    right.set(xlabel="epoch (0: initialisation)", ylabel="feature cosine distance",
              title="feature collapse per stage (higher: more diverse)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
