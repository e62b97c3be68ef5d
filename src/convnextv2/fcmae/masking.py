"""FCMAE masks over the patch grid.

A mask is an (N, L) float tensor, 1 = masked (removed), row-major over the (H/p, W/p) grid.
Every sample keeps the same number of cells, ``int(L * (1 - mask_ratio))``, which is what lets
the sparse encoder hold the visible sites of a batch as one regular (N, K, C) tensor.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch


def num_visible(num_cells: int, mask_ratio: float) -> int:
    """Cells every sample keeps (the official count: ``int(L * (1 - mask_ratio))``)."""
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    return int(num_cells * (1 - mask_ratio))


def _mask_from_noise(noise: torch.Tensor, len_keep: int) -> torch.Tensor:
    """The ``len_keep`` cells with the smallest noise stay visible (argsort of noise)."""
    keep = torch.argsort(noise, dim=1)[:, :len_keep]
    mask = torch.ones_like(noise)
    mask.scatter_(1, keep, 0.0)
    return mask


def random_mask(batch: int, grid_hw: Sequence[int], mask_ratio: float,
                generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh random mask (N, L) for a batch; ``generator`` makes it reproducible.

    Without a generator the noise is drawn on ``device`` itself (its default RNG): on a GPU
    nothing is copied from the host, so drawing a mask never waits for the device.
    """
    h, w = (int(v) for v in grid_hw)
    len_keep = num_visible(h * w, mask_ratio)
    gen_device = generator.device if generator is not None else (device or "cpu")
    noise = torch.rand(batch, h * w, generator=generator, device=gen_device)
    return _mask_from_noise(noise, len_keep).to(device or gen_device)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, sample index), stable across runs."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{int(index)}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_mask(seed: int, epoch: int, indices: Iterable[int] | torch.Tensor,
               grid_hw: Sequence[int], mask_ratio: float,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Masks whose row for a sample depends only on (seed, epoch, sample index).

    Training on any number of processes (or with any batch split) therefore masks each
    image of an epoch the same way.
    """
    h, w = (int(v) for v in grid_hw)
    if isinstance(indices, torch.Tensor):
        indices = indices.flatten().tolist()
    indices = [int(i) for i in indices]
    len_keep = num_visible(h * w, mask_ratio)
    gen = torch.Generator()
    rows = []
    for index in indices:
        gen.manual_seed(sample_seed(seed, epoch, index))
        rows.append(torch.rand(h * w, generator=gen))
    noise = torch.stack(rows) if rows else torch.empty(0, h * w)
    return _mask_from_noise(noise, len_keep).to(device or "cpu")


def upsample_mask(mask: torch.Tensor, grid_hw: Sequence[int], scale: int) -> torch.Tensor:
    """(N, L) mask -> (N, 1, h*scale, w*scale): the mask at a finer feature resolution."""
    h, w = (int(v) for v in grid_hw)
    m = mask.reshape(-1, 1, h, 1, w, 1).expand(-1, 1, h, scale, w, scale)
    return m.reshape(-1, 1, h * scale, w * scale)
