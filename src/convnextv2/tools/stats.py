"""Parameter and multiply-accumulate counts, computed on the meta device (no memory, no init)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.registry import create_model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int | None = None
               ) -> int:
    """Multiply-accumulates of one forward pass on a single image (convolutions and matmuls)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    in_chans = in_chans or model.config["in_chans"]
    device = next(model.parameters()).device
    x = torch.empty(1, in_chans, h, w, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def model_stats(name: str, img_size: int | tuple[int, int] = 224, **overrides) -> dict:
    """Params and GMACs of a named variant, without allocating its weights."""
    with torch.device("meta"):
        model = create_model(name, **overrides).eval()
    return dict(name=name, config=model.config, params=count_params(model),
                macs=count_macs(model, img_size), feature_info=model.feature_info)
