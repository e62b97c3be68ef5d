"""Randomness keyed by (seed, epoch, sample index), for every reader of samples.

A sample's augmentation (and its FCMAE mask) must not depend on which process or loader
worker drew it, nor on what ran before: that is what makes a run replayable and a mid-epoch
resume exact. The map-style datasets (``training.data_order.KeyedAugmentDataset``) and the
streamed tar shards (``data.shards``) both seed their RNGs from these keys. It lives at the
bottom layer so that the data readers can use it without importing the training engine.
"""
from __future__ import annotations

import contextlib
import hashlib
import random

import numpy as np
import torch


def sample_key(seed: int, epoch: int, index: int, salt: str = "augment") -> int:
    """A 63-bit seed from (seed, epoch, index): stable across runs, platforms and processes."""
    digest = hashlib.blake2b(f"{salt}:{int(seed)}:{int(epoch)}:{int(index)}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def keyed_rngs(key: int):
    """Run the body with the global torch (CPU), numpy and python RNGs seeded from ``key``,
    then put the previous states back, so the caller's random streams are untouched. CUDA
    streams stay put. Shared by the map-style ``KeyedAugmentDataset`` and the streamed tar
    shards (``data.shards``), which key each sample the same way."""
    torch_state = torch.get_rng_state()
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        torch.default_generator.manual_seed(key)
        np.random.seed(key % (2 ** 32))
        random.seed(key)
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)
