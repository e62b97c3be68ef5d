"""FCMAE masks over the patch grid: drawing them, checking them, counting and ordering cells.

A mask is an (N, L) float tensor, 1 = masked (removed), row-major over the (H/p, W/p) grid.
Every sample keeps the same number of cells, ``int(L * (1 - mask_ratio))``, which is what lets
the sparse encoder hold the visible sites of a batch as one regular (N, K, C) tensor.

Nothing here reads a device tensor back to the host except ``count_visible`` (free for CPU
masks); ``check_mask`` checks device masks with an asynchronous assert, and ``mask_order``
sorts instead of calling ``nonzero``: the training step never waits for the device.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from ..models.runtime import compiling

if TYPE_CHECKING:
    from ..models.model import ConvNeXtV2


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


def count_visible(mask: torch.Tensor) -> int:
    """Visible cells per sample of a CPU mask, checked to be the same in every sample.

    Reads the mask on the host: free for a CPU tensor, a device-to-host sync for any other
    (which is why the training step passes the count it knows from the mask ratio instead).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (N, L), got shape {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask values must be 0 (visible) or 1 (masked)")
    counts = (mask == 0).sum(dim=1)
    if mask.shape[0] and bool((counts != counts[0]).any()):
        raise ValueError(
            "the sparse backend needs the same number of visible cells in every sample, got "
            f"{sorted(set(counts.tolist()))}; use backend='dense' for such masks")
    return int(counts[0]) if mask.shape[0] else 0


def check_mask(mask: torch.Tensor, num_visible: int) -> None:
    """Every sample keeps ``num_visible`` cells and values are 0/1.

    A CPU mask outside torch.compile is checked at once (ValueError). Otherwise the check is
    an asynchronous device assert (``torch._assert_async``): no host sync; a bad mask fails
    the next synchronising call with a device-side assertion.
    """
    if mask.device.type == "cpu" and not compiling():
        got = count_visible(mask)
        if got != num_visible:
            raise ValueError(f"mask keeps {got} cells per sample, expected {num_visible} "
                             "(int(L * (1 - mask_ratio)))")
        return
    vis = mask == 0
    ok = ((vis | (mask == 1)).all() & (vis.sum(dim=1) == num_visible).all())
    torch._assert_async(ok, "FCMAE mask: values must be 0/1 and every sample must keep "
                            "int(L * (1 - mask_ratio)) visible cells")


def mask_order(mask: torch.Tensor) -> torch.Tensor:
    """(N, L) cell indices: the visible cells ascending, then the masked cells ascending.

    A stable sort of the 0/1 mask: shapes depend on nothing but the mask's shape, so there is
    no ``nonzero`` and no host sync; ``order[:, :K]`` are the visible cells when each sample
    keeps K.
    """
    return torch.argsort(mask.ne(0).to(torch.int32), dim=1, stable=True)


def check_input(model: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """The patch grid of ``imgs``; raises if the image or the mask do not fit the model."""
    p = model.total_stride
    if imgs.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(imgs.shape)}")
    n, c, h, w = imgs.shape
    if c != model.config["in_chans"]:
        raise ValueError(f"the encoder takes {model.config['in_chans']} channels, got {c}")
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {p}")
    hp, wp = h // p, w // p
    if tuple(mask.shape) != (n, hp * wp):
        raise ValueError(f"mask must have shape ({n}, {hp * wp}) for {h}x{w} images with "
                         f"patch size {p}, got {tuple(mask.shape)}")
    return hp, wp


def masked_rows(order: torch.Tensor, num_visible: int) -> torch.Tensor:
    """Flat indices into the N * L cells of every masked cell, grouped by sample, ascending in
    each: where a training decoder has to predict. ``order`` is ``mask_order(mask)`` of a mask
    whose samples keep ``num_visible`` cells each."""
    n, cells = order.shape
    offsets = torch.arange(n, device=order.device).view(n, 1) * cells
    return (order[:, num_visible:] + offsets).reshape(-1)
