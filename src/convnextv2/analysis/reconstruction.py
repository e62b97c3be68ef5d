"""FCMAE reconstructions: the tensors (``reconstruct``) and the figure (``save_reconstruction_grid``).

With ``norm_pix_loss`` the decoder predicts every patch normalised by the target patch's own
mean and unbiased variance, ``(t - mean) / sqrt(var + 1e-6)``. To show pixels, the prediction
is mapped back with the same statistics of the *target* patch: ``pred * sqrt(var + 1e-6) +
mean``. The figure caption says so, since the colours of masked patches then borrow the true
patch's mean and contrast (only the pattern is the model's).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import torch

from ..fcmae.fcmae import NORM_PIX_EPS, FCMAE
from ..fcmae.masking import upsample_mask

COLUMNS = ("original", "masked input", "reconstruction", "reconstruction + visible")


def undo_norm_pix(pred: torch.Tensor, target: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """Map per-patch-normalised predictions (N, L, D) back to pixels with the target patches'
    own mean and unbiased variance (the statistics ``norm_pix_loss`` normalised them with)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + eps).sqrt() + mean


def pixel_mask(fcmae: FCMAE, mask: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(N, L) patch mask -> (N, 1, H, W) pixel mask (1 = removed)."""
    return upsample_mask(mask, grid_hw, fcmae.patch_size)


def reconstruct(fcmae: FCMAE, imgs: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict:
    """Run ``fcmae`` on normalised ``imgs`` (N, C, H, W) and return image tensors (same space).

    Keys: ``original``, ``masked`` (removed pixels set to 0, i.e. the dataset mean),
    ``reconstruction`` (the whole predicted image, de-normalised per patch if norm_pix_loss),
    ``pasted`` (visible pixels from the original, masked ones from the reconstruction),
    ``mask`` (N, L patch mask), ``pixel_mask`` (N, 1, H, W) and ``loss`` (a float).
    ``mask`` None draws one with the model's ratio (``generator`` makes it reproducible).
    """
    device = next(fcmae.parameters()).device
    imgs = imgs.to(device).float()
    if mask is None:
        mask = fcmae.random_mask(imgs, generator=generator)
    mask = mask.to(device)
    was_training = fcmae.training
    fcmae.eval()
    try:
        with torch.no_grad():
            loss, pred, mask = fcmae(imgs, mask)
    finally:
        fcmae.train(was_training)
    pred = pred.float()
    grid = fcmae.grid_size(imgs)
    if fcmae.norm_pix_loss:
        pred = undo_norm_pix(pred, fcmae.patchify(imgs))
    recon = fcmae.unpatchify(pred, grid)
    m = pixel_mask(fcmae, mask.to(imgs.dtype), grid)
    return {
        "original": imgs,
        "masked": imgs * (1 - m),
        "reconstruction": recon,
        "pasted": imgs * (1 - m) + recon * m,
        "mask": mask,
        "pixel_mask": m,
        "loss": float(loss),
    }


def default_caption(fcmae: FCMAE, mask: torch.Tensor) -> str:
    ratio = float(mask.float().mean())
    text = (f"columns: {' | '.join(COLUMNS)}; grey = removed patches "
            f"({ratio:.0%} of {mask.shape[1]} patches of {fcmae.patch_size} px)")
    if fcmae.norm_pix_loss:
        text += ("\nnorm_pix_loss: the prediction is per-patch normalised; shown de-normalised "
                 "with each target patch's own mean and unbiased variance, "
                 f"pred * sqrt(var + {NORM_PIX_EPS:g}) + mean")
    return text


def save_reconstruction_grid(fcmae: FCMAE, imgs: torch.Tensor, mask: torch.Tensor | None,
                             path: str | Path, mean: Sequence[float] | None = None,
                             std: Sequence[float] | None = None, caption: str | None = None,
                             max_images: int = 8) -> Path:
    """Draw one row per image: original | masked input | reconstruction | reconstruction with
    the visible patches pasted back, and save it as a PNG at ``path``.

    ``imgs``: a normalised batch (N, C, H, W), the same as the model trains on; ``mask``: (N, L)
    with 1 = removed, or None for a random one; ``mean``/``std``: the normalisation to undo for
    display (default: the data package's values for the channel count). ``caption`` is shown
    above the standard one, which names the columns and, with norm_pix_loss, how the prediction
    was de-normalised. Works in train mode (restores it) and on any device.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs, mask = imgs[:max_images], (None if mask is None else mask[:max_images])
    out = reconstruct(fcmae, imgs, mask)
    channels = imgs.shape[1]
    if mean is None or std is None:
        from ..data import mean_std
        mean, std = mean_std(channels) if channels in (1, 3) else ((0.0,) * channels, (1.0,) * channels)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def show(x):
        return (x.detach().float().cpu() * s + m).clamp(0, 1)

    pix = out["pixel_mask"].cpu()
    panels = [show(out["original"]), show(out["original"]) * (1 - pix) + 0.5 * pix,
              show(out["reconstruction"]), show(out["pasted"])]
    text = default_caption(fcmae, out["mask"])
    if caption:
        text = f"{caption}\n{text}"
    lines = [wrapped for line in text.splitlines() for wrapped in textwrap.wrap(line, 115)]
    n = imgs.shape[0]
    header = 0.3 + 0.14 * len(lines)          # inches for the caption and the column titles
    height = 2.0 * n + header
    fig, axes = plt.subplots(n, 4, figsize=(8, height), dpi=100, squeeze=False)
    for row in range(n):
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(interpolation="nearest", **_as_image(panel[row]))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(COLUMNS[col], fontsize=9)
    fig.text(0.5, 1 - 0.08 / height, "\n".join(lines), ha="center", va="top", fontsize=7)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.1 / height, wspace=0.05,
                        hspace=0.08, top=1 - (header - 0.05) / height)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _as_image(x: torch.Tensor) -> dict:
    """(C, H, W) in [0, 1] -> imshow arguments: gray for 1 channel, RGB for 3, mean otherwise.
    The gray range is fixed to [0, 1] so every panel shares one scale."""
    if x.shape[0] == 3:
        return dict(X=x.permute(1, 2, 0).numpy())
    gray = x.mean(dim=0) if x.shape[0] != 1 else x[0]
    return dict(X=gray.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
