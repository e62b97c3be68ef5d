"""Layer-wise learning-rate decay for detection and segmentation backbones.

This is the rule of ConvNeXt's detection and segmentation configurations, which differs from
the classification rule in ``recipes/layer_decay.py``: fewer layer ids (stage 2 is cut into
groups of three blocks), and everything outside the backbone (FPN, RPN, RoI heads, UPerNet)
learns at the full rate.

With ``N = num_layers + 2`` a parameter with layer id ``i`` gets ``rate ** (N - i - 1)``.

``layer_wise`` ids: stem 0; stage 0 blocks 1; downsample 1 and stage 1 blocks 2; downsample 2
is 3; stage 2 block b is ``3 + b // 3``; downsample 3 and stage 3 blocks ``num_layers``;
anything else ``num_layers + 1`` (scale 1).
``stage_wise`` ids: the stem and every downsample 0; the blocks of stage s ``s + 1``; anything
else ``num_layers + 1``.

``num_layers`` is 6 for ConvNeXt-T and 12 for the larger models in those configurations, which
is ``3 + ceil(depths[2] / 3)``; that formula is the default here, so small variants get the
matching count (atto: 5). Biases and other 1-D parameters (norms, GRN) get no weight decay.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from ..training.schedule import skips_weight_decay

MODES = ("layer_wise", "stage_wise")


def default_num_layers(depths: Sequence[int]) -> int:
    """6 for tiny's (3,3,9,3), 12 for base/large/huge's (3,3,27,3)."""
    return 3 + math.ceil(int(depths[2]) / 3)


def layer_id(name: str, num_layers: int, mode: str = "layer_wise") -> int:
    """Layer id of a parameter named as in the classifier (``stem.*``, ``stages.S.downsample.*``,
    ``stages.S.blocks.B.*``), after any prefix up to ``stem`` / ``stages``; other names (the
    heads, the added output norms) are outside the backbone."""
    if mode not in MODES:
        raise ValueError(f"unknown layer-decay mode {mode!r}; choose one of {', '.join(MODES)}")
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in ("stem", "stages"):
            parts = parts[i:]
            break
    else:
        return num_layers + 1
    if parts[0] == "stem":
        return 0
    if len(parts) < 3 or parts[0] != "stages" or not parts[1].isdigit():
        return num_layers + 1
    stage = int(parts[1])
    if parts[2] == "downsample":
        if mode == "stage_wise":
            return 0
        return (0, 2, 3, num_layers)[stage]
    if parts[2] == "blocks":
        if mode == "stage_wise":
            return stage + 1
        block = int(parts[3])
        return (1, 2, 3 + block // 3, num_layers)[stage]
    return num_layers + 1


def lr_scale(name: str, num_layers: int, rate: float, mode: str = "layer_wise") -> float:
    return rate ** (num_layers + 2 - layer_id(name, num_layers, mode) - 1)


def param_groups(model: nn.Module, *, weight_decay: float, rate: float = 1.0,
                 mode: str = "layer_wise", num_layers: int | None = None,
                 backbone_prefix: str = "backbone.",
                 depths: Sequence[int] | None = None) -> list[dict]:
    """AdamW parameter groups with ``lr_scale`` (multiplied into the scheduled lr) and
    ``weight_decay``; one group per (layer id, decay or not). Only parameters whose name starts
    with ``backbone_prefix`` are backbone layers; frozen parameters are left out."""
    if num_layers is None:
        if depths is None:
            raise ValueError("param_groups needs num_layers or the backbone's depths")
        num_layers = default_num_layers(depths)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = (layer_id(name[len(backbone_prefix):], num_layers, mode)
               if name.startswith(backbone_prefix) else num_layers + 1)
        no_wd = skips_weight_decay(name, param)
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = dict(params=[], names=[], layer_id=lid,
                               weight_decay=0.0 if no_wd else weight_decay,
                               lr_scale=rate ** (num_layers + 2 - lid - 1))
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]
