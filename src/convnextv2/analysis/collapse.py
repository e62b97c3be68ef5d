"""Feature collapse: how different the channels of an activation are from one another.

The paper (section 3, Fig. 4) measures it as the average pairwise cosine distance between the
channels of a layer's output: each channel's H x W map is one vector, and

    score = 1/C^2 * sum_{i,j} (1 - cos(X_i, X_j)) / 2        in [0, 1]

0 means every channel points the same way (collapsed); higher means more diverse features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..models.model import Block

ZERO_NORM_EPS = 1e-12


def feature_diversity(act: torch.Tensor, eps: float = ZERO_NORM_EPS) -> torch.Tensor:
    """Average pairwise cosine distance of the channels of ``act``, averaged over images.

    ``act``: one activation (C, H, W) or a batch (N, C, H, W); computed in float64.

    Zero channels: a channel whose L2 norm is <= ``eps`` has no direction. We count two such
    channels as identical (cosine 1: two dead channels carry the same - no - information) and a
    zero channel as orthogonal (cosine 0) to any non-zero channel. An all-zero activation thus
    scores 0, fully collapsed, which is what a layer of dead channels is.
    """
    if act.dim() == 3:
        act = act.unsqueeze(0)
    if act.dim() != 4:
        raise ValueError(f"expected (C, H, W) or (N, C, H, W), got shape {tuple(act.shape)}")
    n, c = act.shape[:2]
    x = act.detach().reshape(n, c, -1).double()
    norms = x.norm(dim=-1)                                        # (N, C)
    zero = norms <= eps
    unit = torch.where(zero.unsqueeze(-1), torch.zeros_like(x),
                       x / norms.clamp_min(eps).unsqueeze(-1))
    # sum_ij cos(X_i, X_j) = |sum_i u_i|^2 for unit vectors u_i (zero channels: u = 0), which
    # is O(C * HW) instead of a C x C Gram matrix; then the zero-zero pairs count as cosine 1.
    cos_sum = unit.sum(dim=1).pow(2).sum(dim=-1) + zero.sum(dim=1).double() ** 2
    per_image = (1.0 - cos_sum / (c * c)) / 2.0                   # 1/C^2 sum_ij (1 - cos) / 2
    return per_image.mean()


def block_names(model: nn.Module) -> list[str]:
    """Qualified names of every ConvNeXt ``Block`` of the encoder, in forward order."""
    return [name for name, m in _encoder(model).named_modules() if isinstance(m, Block)]


SITES = ("block", "expansion")


def collapse_profile(model: nn.Module, images: torch.Tensor, batch_size: int = 32,
                     progress: bool = False, site: str = "block") -> dict:
    """Feature diversity at every block, for a batch of (already normalised) images.

    ``model``: a ``ConvNeXtV2`` (or an ``FCMAE``, whose encoder is used). ``site``:
      - ``"block"``: the block's output (after the residual sum);
      - ``"expansion"``: the 4x-wide hidden activation that enters ``pwconv2`` (GELU output,
        after GRN when the block has one), where the paper saw collapse. The residual path
        does not mask it there, which matters for V1 blocks whose layer scale starts at 1e-6.
    Returns ``{"layers": names, "index": normalised layer index, "scores": diversity per
    block, "site": site}``; the index of block k of K is k / (K - 1), so first and last block
    sit at 0 and 1 whatever the depth, which lets models of different depths share one plot.
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    encoder = _encoder(model)
    blocks = [(name, m) for name, m in encoder.named_modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ConvNeXt Block to measure")
    sums = [0.0] * len(blocks)
    current: list[torch.Tensor | None] = [None] * len(blocks)

    def hook_for(k):
        def block_output(_module, _inputs, output):
            current[k] = output

        def expansion(_module, inputs):  # channels-last (N, H, W, 4C) -> (N, 4C, H, W)
            current[k] = inputs[0].permute(0, 3, 1, 2)
        return block_output if site == "block" else expansion

    if site == "block":
        handles = [m.register_forward_hook(hook_for(k)) for k, (_, m) in enumerate(blocks)]
    else:
        handles = [m.pwconv2.register_forward_pre_hook(hook_for(k))
                   for k, (_, m) in enumerate(blocks)]
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="collapse", unit="batch", leave=False)
    try:
        with torch.no_grad():
            for start in starts:
                batch = images[start:start + batch_size].to(device)
                encoder.forward_features(batch)
                for k, out in enumerate(current):
                    sums[k] += float(feature_diversity(out)) * len(batch)
    finally:
        for h in handles:
            h.remove()
        encoder.train(was_training)
    count = len(blocks)
    return {
        "layers": [name for name, _ in blocks],
        "index": [k / (count - 1) if count > 1 else 0.0 for k in range(count)],
        "scores": [s / len(images) for s in sums],
        "num_images": int(len(images)),
        "site": site,
    }


def sample_images(data: str, count: int, img_size: int, in_chans: int, split: str, seed: int):
    """``count`` images chosen with ``seed``: the same ones for every model of a comparison
    (``analyze collapse``) and for the pretraining monitor, so that both give one number."""
    from ..data import build_dataset, eval_transform

    ds = build_dataset(data, split, eval_transform(img_size, in_chans))
    if count < 1:
        raise ValueError(f"--images must be >= 1, got {count}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=gen)[:count].tolist()
    return torch.stack([ds[i][0] for i in order])


def save_collapse_plot(profiles: Sequence[dict], labels: Sequence[str], path: str | Path,
                       title: str | None = None) -> Path:
    """One PNG: diversity vs normalised layer index, one line per profile."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for profile, label in zip(profiles, labels):
        ax.plot(profile["index"], profile["scores"], marker="o", markersize=3, label=label)
    ax.set_xlabel("normalised layer index (block k / (K-1))")
    ax.set_ylabel("feature cosine distance")
    ax.set_xlim(-0.02, 1.02)
    top = max((max(pr["scores"]) for pr in profiles), default=0.5)
    ax.set_ylim(0, min(1.0, max(0.55, top + 0.05)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Feature collapse: average pairwise channel cosine distance", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _encoder(model: nn.Module) -> nn.Module:
    """The ConvNeXtV2 inside an FCMAE, or the model itself."""
    return getattr(model, "encoder", model)
