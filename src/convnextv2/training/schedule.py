"""Learning-rate schedules and optimizer parameter groups, shared by every training command.

A schedule is a pure function of the iteration (optimizer step), so a resumed run recomputes
exactly the rate the uninterrupted run used; every schedule has the one interface the engine
calls, ``schedule.step(global_step) -> lr``, which writes the rate into every parameter group
multiplied by the group's ``lr_scale`` (1 when absent; layer-wise decay sets it per group).
``WarmupCosineSchedule`` serves pretraining and fine-tuning, ``WarmupDecaySchedule`` (poly,
step, cosine) detection and segmentation.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

from torch import nn

NO_DECAY_LEAVES = ("bias", "gamma", "beta", "mask_token")


def warmup_cosine_lr(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0,
                     min_lr: float = 0.0, start_lr: float = 0.0) -> float:
    """Linear warmup from ``start_lr`` to ``base_lr`` over ``warmup_steps``, then half a cosine
    from ``base_lr`` down to ``min_lr`` at ``total_steps`` (held there afterwards).

    Step 0 gives ``start_lr``; step ``warmup_steps`` gives ``base_lr``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PerStepSchedule:
    """A learning rate that is a pure function of the optimizer step, bound to an optimizer:
    ``schedule.step(global_step)`` sets every group's lr (times its ``lr_scale``) and returns
    the base value. Subclasses say ``lr_at(step)``; every schedule counts its warmup in
    ``warmup_steps``, which the engine's shared ``--warmup-steps`` option replaces."""

    optimizer = None
    warmup_steps: int = 0

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    def step(self, step: int) -> float:
        lr = self.lr_at(step)
        set_lr(self.optimizer, lr)
        return lr


class WarmupCosineSchedule(PerStepSchedule):
    """Linear warmup then half a cosine (pretraining and fine-tuning).

    ``steps_per_epoch`` converts the epoch-based recipe values (``epochs``, ``warmup_epochs``)
    into optimizer steps; ``warmup_steps``, when given, sets the warmup in steps instead (the
    official fine-tuning script's ``--warmup_steps``).
    """

    def __init__(self, optimizer, *, base_lr: float, epochs: int, steps_per_epoch: int,
                 warmup_epochs: float = 0.0, min_lr: float = 0.0,
                 warmup_steps: int | None = None):
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.base_lr, self.min_lr = float(base_lr), float(min_lr)
        self.total_steps = int(epochs * steps_per_epoch)
        self.warmup_steps = (int(warmup_steps) if warmup_steps
                             else int(round(warmup_epochs * steps_per_epoch)))

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(step, base_lr=self.base_lr, total_steps=self.total_steps,
                                warmup_steps=self.warmup_steps, min_lr=self.min_lr)


DECAYS = ("poly", "step", "cosine")


class WarmupDecaySchedule(PerStepSchedule):
    """The per-iteration schedules of the detection and segmentation recipes (OpenMMLab's):

    - ``poly`` (UPerNet on ADE20K): ``(base - min) * (1 - t / T) ** power + min``, power 1;
    - ``step`` (Mask R-CNN 3x): the base lr divided by 10 at 27/36 and again at 33/36 of the
      run (epochs 27 and 33 of 36);
    - ``cosine``: half a cosine from the base lr to ``min_lr`` over the whole run.

    The warmup multiplies the decayed value by a factor rising linearly from ``warmup_ratio``
    to 1 over ``warmup_steps``, as those schedules do (the decay already runs meanwhile).
    """

    def __init__(self, optimizer, *, base_lr: float, total_steps: int, kind: str = "poly",
                 warmup_steps: int = 0, warmup_ratio: float = 1e-6, min_lr: float = 0.0,
                 power: float = 1.0, milestones: Sequence[float] = (27 / 36, 33 / 36),
                 gamma: float = 0.1):
        if kind not in DECAYS:
            raise ValueError(f"--schedule {kind!r}: choose one of {', '.join(DECAYS)}")
        if total_steps < 1:
            raise ValueError(f"a schedule needs at least 1 step, got {total_steps}")
        self.optimizer, self.kind = optimizer, kind
        self.base_lr, self.total_steps, self.min_lr = float(base_lr), int(total_steps), min_lr
        self.warmup_steps, self.warmup_ratio = int(warmup_steps), warmup_ratio
        self.power, self.milestones, self.gamma = power, tuple(milestones), gamma

    def decayed_lr(self, step: int) -> float:
        """The lr before the warmup factor."""
        t = min(max(step, 0), self.total_steps)
        if self.kind == "step":
            drops = sum(t >= round(m * self.total_steps) for m in self.milestones)
            return self.base_lr * self.gamma ** drops
        span = self.base_lr - self.min_lr
        if self.kind == "poly":
            return span * (1 - t / self.total_steps) ** self.power + self.min_lr
        return self.min_lr + span * 0.5 * (1 + math.cos(math.pi * t / self.total_steps))

    def lr_at(self, step: int) -> float:
        """The lr of optimizer step ``step`` (0-based)."""
        lr = self.decayed_lr(step)
        if step < self.warmup_steps:
            lr *= 1 - (1 - step / self.warmup_steps) * (1 - self.warmup_ratio)
        return lr


def set_lr(optimizer, lr: float) -> None:
    """``group["lr"] = lr * group.get("lr_scale", 1)`` for every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clip_warmup_epochs(warmup_epochs: float, epochs: int) -> float:
    """The recipe's warmup (40 epochs) would swallow a short run whole; cap it at a quarter
    of the run so the cosine part still happens (a 800-epoch run keeps its 40)."""
    return min(float(warmup_epochs), epochs / 4.0)


def scaled_lr(blr: float, effective_batch: int) -> float:
    """The linear scaling rule of the recipes: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch / 256


def skips_weight_decay(name: str, param) -> bool:
    """Biases, every 1-D tensor (norm weights, layer scale) and GRN gamma/beta / mask tokens
    whatever their shape: decaying them only pulls normalisation statistics toward zero."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf in NO_DECAY_LEAVES or ".grn." in f".{name}."


def official_pretrain_exempt(name: str, param) -> bool:
    """True when the official FCMAE pretraining exempts ``name`` from weight decay.

    The official script builds its groups with timm's ``param_groups_weight_decay``, which
    exempts biases and 1-D tensors only. Its GRN gamma/beta are 2-D ((1, C) in the sparse
    encoder, (1, 1, 1, C) in the decoder) and its mask token 4-D, so they ARE decayed there.
    Here GRN parameters are 1-D, hence the explicit exception: this reproduces the official
    groups, not the shapes."""
    if name.endswith(".bias"):
        return True
    return param.ndim <= 1 and ".grn." not in f".{name}."


# ``--wd-exempt``: which parameters pretraining leaves undecayed
PRETRAIN_NO_DECAY = {"official": official_pretrain_exempt, "grn": skips_weight_decay}


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = (),
                 no_decay: Callable[[str, nn.Parameter], bool] = skips_weight_decay) -> list[dict]:
    """Two AdamW groups: ``weight_decay`` for weight matrices / kernels, 0 for the rest.

    ``skip`` names (exact parameter names) are forced into the no-decay group; ``no_decay``
    decides for the others. Frozen parameters are left out. Each group carries ``lr_scale``
    1.0 and its parameter ``names``, so callers can split groups further (layer decay).
    """
    skip = set(skip)
    decay = dict(params=[], names=[], weight_decay=float(weight_decay), lr_scale=1.0)
    plain = dict(params=[], names=[], weight_decay=0.0, lr_scale=1.0)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = plain if name in skip or no_decay(name, param) else decay
        group["params"].append(param)
        group["names"].append(name)
    return [g for g in (decay, plain) if g["params"]]
