"""Per-iteration learning-rate schedules of the transfer recipes.

- ``poly`` (segmentation, UPerNet on ADE20K): ``lr = (base - min) * (1 - t / T) ** power + min``
  with power 1.0 and a linear warmup over the first iterations (1500 in the recipe);
- ``step`` (detection, Mask R-CNN 3x): the base lr divided by 10 at 27/36 and again at 33/36 of
  the run, after a short linear warmup;
- ``cosine``: half-cosine to ``min_lr`` after warmup (short runs such as the demos).

Warmup starts at ``warmup_ratio * lr`` and rises linearly to the scheduled value, as in the
OpenMMLab schedules the papers' numbers come from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

SCHEDULES = ("poly", "step", "cosine")


@dataclass
class TransferSchedule:
    base_lr: float
    total_steps: int
    kind: str = "poly"
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6
    min_lr: float = 0.0
    power: float = 1.0
    milestones: Sequence[float] = (27 / 36, 33 / 36)  # fractions of the run (steps 27, 33 of 36)
    gamma: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"--schedule {self.kind!r}: choose one of {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least 1 step, got {self.total_steps}")

    def main_lr(self, step: int) -> float:
        t = min(max(step, 0), self.total_steps)
        if self.kind == "poly":
            return (self.base_lr - self.min_lr) * (1 - t / self.total_steps) ** self.power + self.min_lr
        if self.kind == "step":
            drops = sum(t >= round(m * self.total_steps) for m in self.milestones)
            return self.base_lr * self.gamma ** drops
        progress = t / self.total_steps
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        """The lr of optimizer step ``step`` (0-based)."""
        lr = self.main_lr(step)
        if step < self.warmup_steps:
            k = (1 - step / self.warmup_steps) * (1 - self.warmup_ratio)
            lr *= 1 - k
        return lr

    def apply(self, optimizer, step: int) -> float:
        """Set every group's lr to ``lr_at(step) * group['lr_scale']``; returns the base value."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
