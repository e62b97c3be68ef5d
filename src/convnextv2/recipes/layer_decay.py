"""Layer-wise learning-rate decay for fine-tuning (the official rule; docs/recipes.md).

Each parameter gets a layer id; its learning rate is scaled by
``layer_decay ** (num_layers + 1 - id)``, so the head learns at the full rate and layers
closer to the input progressively slower.

"single" mode: ``num_layers = sum(depths)``; the stem and downsample k get
``sum(depths[:k]) + 1``; block b of stage s gets ``sum(depths[:s]) + b + 1``; the final norm
and head get ``num_layers + 1``.
"group" mode (made for depths 3,3,27,3): ``num_layers = 12``; the stem and downsamples 1/2/3
get 0/2/3/12; stage 0 blocks 1; stage 1 blocks 2; stage 2 block b ``3 + b // 3``; stage 3
blocks 12; everything else 13.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..training.schedule import skips_weight_decay

MODES = ("single", "group")
GROUP_NUM_LAYERS = 12


def num_layers(depths: Sequence[int], mode: str = "single") -> int:
    _check_mode(mode)
    return sum(depths) if mode == "single" else GROUP_NUM_LAYERS


def layer_id(name: str, depths: Sequence[int], mode: str = "single") -> int:
    """The layer id of parameter ``name`` of a dense ConvNeXtV2 (``stem.*``, ``stages.S.
    downsample.*``, ``stages.S.blocks.B.*``, ``head.*``); unknown names count as the head."""
    _check_mode(mode)
    parts = name.split(".")
    top = num_layers(depths, mode) + 1
    if parts[0] == "stem":
        return 1 if mode == "single" else 0
    if parts[0] == "stages" and len(parts) > 2:
        stage = int(parts[1])
        if parts[2] == "downsample":
            if mode == "single":
                return sum(depths[:stage]) + 1
            return (0, 2, 3, GROUP_NUM_LAYERS)[stage]
        if parts[2] == "blocks":
            block = int(parts[3])
            if mode == "single":
                return sum(depths[:stage]) + block + 1
            return (1, 2, 3 + block // 3, GROUP_NUM_LAYERS)[stage]
    return top


def layer_scale(name: str, depths: Sequence[int], layer_decay: float,
                mode: str = "single") -> float:
    return layer_decay ** (num_layers(depths, mode) + 1 - layer_id(name, depths, mode))


def param_groups_layer_decay(model: nn.Module, weight_decay: float = 0.05,
                             layer_decay: float = 1.0, mode: str = "single",
                             depths: Sequence[int] | None = None) -> list[dict]:
    """Optimizer parameter groups: one per (layer id, decay / no decay), each with
    ``lr_scale`` (multiply into the scheduled lr), ``weight_decay``, ``layer_id`` and the
    parameter ``names``. Frozen parameters (``requires_grad=False``) are left out; which
    parameters skip weight decay is the training engine's rule (``skips_weight_decay``: biases,
    1-D tensors, GRN gamma/beta)."""
    depths = list(depths or model.config["depths"])
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, depths, mode)
        no_wd = skips_weight_decay(name, param)
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = dict(params=[], names=[], layer_id=lid,
                               weight_decay=0.0 if no_wd else weight_decay,
                               lr_scale=layer_decay ** (num_layers(depths, mode) + 1 - lid))
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown layer-decay mode {mode!r}; choose one of {', '.join(MODES)}")
