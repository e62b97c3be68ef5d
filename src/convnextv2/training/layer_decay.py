"""Layer-wise learning-rate decay: one parameter-group builder, pluggable layer-id rules.

Each parameter gets a layer id; its learning rate is scaled by
``layer_decay ** (num_layers + 1 - id)``, so what sits outside the backbone (the classifier,
FPN, RPN, RoI or UPerNet heads) learns at the full rate and layers closer to the input
progressively slower. Only the layer-id rule differs between recipes (``RULES``):

- ``single`` (fine-tuning, the official classification rule): ``num_layers = sum(depths)``;
  the stem is 1, downsample k ``sum(depths[:k]) + 1``, block b of stage s
  ``sum(depths[:s]) + b + 1``.
- ``group`` (fine-tuning of the 3-3-27-3 networks) and ``layer_wise`` (detection): stage 2
  is cut into groups of three blocks. The stem is 0; stage 0 blocks 1; downsample 1 and
  stage 1 blocks 2; downsample 2 is 3; stage 2 block b ``3 + b // 3``; downsample 3 and
  stage 3 blocks ``num_layers``. The two differ only in the default ``num_layers``: 12 for
  ``group`` (the classification script's constant), ``3 + ceil(depths[2] / 3)`` for
  ``layer_wise`` (6 for tiny, 12 for base and larger, as ConvNeXt's detection and
  segmentation configs set it; small variants get the matching count, atto 5).
- ``stage_wise`` (segmentation): the stem and every downsample 0, the blocks of stage s
  ``s + 1``, ``num_layers`` as for ``layer_wise``.

Everything that is not a backbone layer gets ``num_layers + 1`` (scale 1). These are the
rules of the official optimizer constructors (``optim_factory.py`` for classification, the
mmdet/mmseg ``LearningRateDecayOptimizerConstructor``); tests check them against independent
write-ups. A new rule is a function ``(place, depths, num_layers) -> id`` added to ``RULES``.
Biases and other 1-D parameters (norms, GRN) get no weight decay.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

from torch import nn

from .schedule import skips_weight_decay

GROUP_NUM_LAYERS = 12


class Place(NamedTuple):
    """Where a parameter sits in the backbone: ``kind`` is "stem", "downsample" or "block"."""
    kind: str
    stage: int = 0
    block: int = 0


def backbone_place(name: str) -> Place | None:
    """The place of a parameter named as in the classifier (``stem.*``, ``stages.S.
    downsample.*``, ``stages.S.blocks.B.*``), after any prefix up to ``stem`` / ``stages``
    (a detector's ``backbone.body.body.``); None for everything else (heads, added norms)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ("stem", "stages"):
            parts = parts[i:]
            break
    else:
        return None
    if parts[0] == "stem":
        return Place("stem")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    if parts[2] == "downsample":
        return Place("downsample", int(parts[1]))
    if parts[2] == "blocks" and len(parts) > 3 and parts[3].isdigit():
        return Place("block", int(parts[1]), int(parts[3]))
    return None


def _single_id(place: Place, depths: Sequence[int], num_layers: int) -> int:
    if place.kind == "stem":
        return 1
    before = sum(depths[:place.stage])
    return before + 1 if place.kind == "downsample" else before + place.block + 1


def _grouped_id(place: Place, depths: Sequence[int], num_layers: int) -> int:
    if place.kind == "stem":
        return 0
    if place.kind == "downsample":
        return (0, 2, 3, num_layers)[place.stage]
    return (1, 2, 3 + place.block // 3, num_layers)[place.stage]


def _stage_id(place: Place, depths: Sequence[int], num_layers: int) -> int:
    return place.stage + 1 if place.kind == "block" else 0


Rule = Callable[[Place, Sequence[int], int], int]
RULES: dict[str, Rule] = {"single": _single_id, "group": _grouped_id,
                          "layer_wise": _grouped_id, "stage_wise": _stage_id}
MODES = tuple(RULES)


def default_num_layers(depths: Sequence[int], mode: str = "layer_wise") -> int:
    """The layer count of ``mode``'s rule for a backbone of ``depths``."""
    check_mode(mode)
    if mode == "single":
        return sum(depths)
    if mode == "group":
        return GROUP_NUM_LAYERS
    return 3 + math.ceil(int(depths[2]) / 3)


def layer_id(name: str, depths: Sequence[int], mode: str = "single",
             num_layers: int | None = None) -> int:
    """The layer id of parameter ``name`` (see the module docstring); names outside the
    backbone get ``num_layers + 1``."""
    num_layers = num_layers or default_num_layers(depths, mode)
    place = backbone_place(name)
    return num_layers + 1 if place is None else RULES[mode](place, depths, num_layers)


def layer_scale(name: str, depths: Sequence[int], layer_decay: float, mode: str = "single",
                num_layers: int | None = None) -> float:
    """The factor multiplied into the scheduled lr of parameter ``name``."""
    num_layers = num_layers or default_num_layers(depths, mode)
    return layer_decay ** (num_layers + 1 - layer_id(name, depths, mode, num_layers))


def param_groups_layer_decay(model: nn.Module, weight_decay: float = 0.05,
                             layer_decay: float = 1.0, mode: str = "single",
                             depths: Sequence[int] | None = None, num_layers: int | None = None,
                             prefix: str = "") -> list[dict]:
    """Optimizer parameter groups: one per (layer id, decay / no decay), each with
    ``lr_scale`` (multiplied into the scheduled lr by the schedule), ``weight_decay``,
    ``layer_id`` and the parameter ``names``.

    ``depths``: the backbone's (default ``model.config["depths"]``); ``prefix``: only
    parameters whose name starts with it are backbone layers (``"backbone."`` in detectors
    and segmenters), the others learn at the full rate. Frozen parameters are left out;
    which parameters skip weight decay is the engine's rule (``skips_weight_decay``)."""
    check_mode(mode)
    depths = list(depths or model.config["depths"])
    num_layers = num_layers or default_num_layers(depths, mode)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = (layer_id(name[len(prefix):], depths, mode, num_layers)
               if name.startswith(prefix) else num_layers + 1)
        no_wd = skips_weight_decay(name, param)
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = dict(params=[], names=[], layer_id=lid,
                               weight_decay=0.0 if no_wd else weight_decay,
                               lr_scale=layer_decay ** (num_layers + 1 - lid))
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def check_mode(mode: str) -> None:
    if mode not in RULES:
        raise ValueError(f"--layer-decay-mode {mode!r}: choose one of {', '.join(MODES)}")
