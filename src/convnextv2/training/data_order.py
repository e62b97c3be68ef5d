"""Sample order and augmentation randomness that depend only on (seed, epoch, sample index).

Two pieces make a run reproducible whatever the number of processes or data-loader workers,
and make resuming in the middle of an epoch exact:

- ``ResumableSampler`` wraps a ``DistributedSampler`` (whose epoch order is a function of
  seed and epoch) and can start an epoch after the batches already done;
- ``KeyedAugmentDataset`` runs each sample's transform with torch, numpy and python RNGs seeded
  from (seed, epoch, index), so a random crop does not depend on which worker drew it or on
  what ran before.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from ..data.keyed_random import keyed_rngs, sample_key  # noqa: F401  (re-exported)


class KeyedAugmentDataset(Dataset):
    """``dataset[i]`` computed under RNGs seeded by (seed, epoch, i); call ``set_epoch`` before
    each epoch's loader is iterated (workers copy the dataset when the iterator starts).

    The surrounding RNG states are saved and restored, so the caller's streams are untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with keyed_rngs(sample_key(self.seed, self.epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name):  # .classes, .num_skipped, ... of the wrapped dataset
        # never dunders: a forwarded Subset.__getitems__ would let the DataLoader fetch whole
        # batches past __getitem__, i.e. without the keyed RNGs
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableSampler(Sampler):
    """A ``DistributedSampler`` whose epoch can begin after ``skip`` of this rank's samples.

    ``set_epoch(epoch, skip=0)``; the skip applies to that epoch only (the next ``set_epoch``
    call resets it), which is how a run resumed mid-epoch jumps over the batches already done.
    """

    def __init__(self, base):
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self):
        order = list(iter(self.base))
        return iter(order[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)
