"""Per-channel activation maps of one layer (the paper's Fig. 3 view).

Layer names are the model's module names: ``stem``, ``stages.2``, ``stages.1.downsample``,
``stages.2.blocks.3`` (a block's output) or a part inside a block such as
``stages.2.blocks.3.pwconv1`` / ``.act`` / ``.grn``. Parts after the depthwise conv work
channels-last; their outputs are turned back to (C, H, W) here.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Children of a Block whose outputs are channels-last (N, H, W, C).
_CHANNELS_LAST_PARTS = ("norm", "pwconv1", "act", "grn", "pwconv2")
_BLOCK_PARTS = ("dwconv",) + _CHANNELS_LAST_PARTS


def layer_names(model: nn.Module) -> list[str]:
    """Every layer name ``layer_activation`` accepts, in forward order."""
    encoder = getattr(model, "encoder", model)
    names = ["stem"]
    for s, stage in enumerate(encoder.stages):
        if not isinstance(stage.downsample, nn.Identity):
            names.append(f"stages.{s}.downsample")
        for b, block in enumerate(stage.blocks):
            names.append(f"stages.{s}.blocks.{b}")
            names += [f"stages.{s}.blocks.{b}.{part}" for part in _BLOCK_PARTS
                      if getattr(block, part, None) is not None]
        names.append(f"stages.{s}")
    return names


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name``; a ValueError listing the valid names otherwise."""
    encoder = getattr(model, "encoder", model)
    if name not in layer_names(model):
        blocks = [n for n in layer_names(model) if n.count(".") <= 3]
        raise ValueError(
            f"unknown layer {name!r}; valid names: {', '.join(blocks)}; inside a block append "
            f"one of .{', .'.join(_BLOCK_PARTS)} (e.g. stages.2.blocks.0.pwconv1)")
    return encoder.get_submodule(name)


def layer_activation(model: nn.Module, image: torch.Tensor, name: str) -> torch.Tensor:
    """The (C, H, W) output of layer ``name`` for one normalised image (C, H, W) or (1, C, H, W)."""
    encoder = getattr(model, "encoder", model)
    module = resolve_layer(model, name)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image (C, H, W), got shape {tuple(image.shape)}")
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            encoder.forward_features(image.to(next(encoder.parameters()).device))
    finally:
        handle.remove()
        encoder.train(was_training)
    out = captured[0][0]
    if name.rsplit(".", 1)[-1] in _CHANNELS_LAST_PARTS:
        out = out.permute(2, 0, 1)
    return out.float().cpu()


def activation_grid(act: torch.Tensor, max_channels: int = 64, pad: int = 1) -> torch.Tensor:
    """Tile the first ``max_channels`` maps of ``act`` (C, H, W) into one (rows*H, cols*W) image.

    Each map is min-max scaled to [0, 1] on its own (the paper's view: the pattern of each
    channel, not its magnitude); a constant map becomes 0. Padding is NaN (drawn blank).
    """
    if act.dim() != 3:
        raise ValueError(f"expected (C, H, W), got shape {tuple(act.shape)}")
    maps = act[:max_channels].float()
    c, h, w = maps.shape
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    maps = torch.where(span > 0, (maps - lo) / span.clamp_min(1e-12), torch.zeros_like(maps))
    cols = int(torch.ceil(torch.tensor(c ** 0.5)).item())
    rows = (c + cols - 1) // cols
    grid = torch.full((rows * (h + pad) - pad, cols * (w + pad) - pad), float("nan"))
    for k in range(c):
        r, q = divmod(k, cols)
        grid[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = maps[k]
    return grid


def save_activation_grid(act: torch.Tensor, path: str | Path, title: str = "",
                         max_channels: int = 64) -> Path:
    """Draw ``activation_grid(act)`` to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = activation_grid(act, max_channels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side = 8
    fig, ax = plt.subplots(figsize=(side, side * grid.shape[0] / grid.shape[1] + 0.6), dpi=120)
    ax.imshow(grid.numpy(), cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    ax.set_axis_off()
    shown = min(act.shape[0], max_channels)
    ax.set_title(f"{title}\n{shown} of {act.shape[0]} channels, {act.shape[1]}x{act.shape[2]}, "
                 f"each map scaled to its own min-max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
