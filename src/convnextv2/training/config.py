"""The options every training run shares, and the checks made before a run writes anything.

``PretrainConfig``, ``FinetuneConfig`` and ``TransferConfig`` (detection, segmentation) all
inherit ``RunConfig``, so the run fields (output, seed, device, precision, workers, resume,
checkpoints, logging, accumulation, warmup steps, drop path) have one name, one default rule
and one validation, and the command line fills any of these configs the same way
(``config_from_args``). The checks here only read: a refused run leaves its ``--output``
exactly as it was, which is why they run before the first file is written. What a run may do
with its output folder is decided in ``training.output``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..models.model import GRAD_CHECKPOINTING
from ..models.variants import block_kwargs
from .runstate import plain
from .step import AMP_MODES



@dataclass
class RunConfig:
    """How a run is executed and recorded, whatever it trains.

    The model fields describe the architecture identically for every recipe: a variant
    name, optionally reshaped by ``depths``/``dims``/``stem_stride``/``in_chans``,
    ``v1_block`` for the V1 ablation block, ``drop_path`` for stochastic depth, and
    ``model_kwargs`` for any other constructor argument. ``None`` means the recipe's value.
    """
    # the architecture
    model: str | None = "convnextv2_atto"
    in_chans: int | None = None           # None: the checkpoint's, else 3
    stem_stride: int | None = None        # None: the variant's (4)
    depths: Sequence[int] | None = None
    dims: Sequence[int] | None = None
    v1_block: bool = False                # ConvNeXt V1 block (no GRN, layer scale 1e-6)
    drop_path: float | None = None        # stochastic depth rate; None: the recipe's
    model_kwargs: dict = field(default_factory=dict)
    # data and output
    data: str = "builtin"
    output: str = "runs/run"
    img_size: int | None = None
    workers: int = 2
    strict_data: bool = False             # unreadable images are fatal instead of skipped
    # optimisation shared by every recipe
    batch_size: int | None = None         # per process and micro-batch
    accum_steps: int = 1                  # micro-batches per optimizer step
    warmup_steps: int | None = None       # linear warmup in optimizer steps; None: the recipe's
    amp: str | None = "none"              # "bf16" / "fp16" autocast; None / "none": float32
    compile: bool = False                 # torch.compile the model
    grad_checkpointing: str | None = None  # "block" / "stage": recompute activations in backward
    # execution
    device: str | None = None             # None / "auto": this process's GPU when there is one
    seed: int = 0
    deterministic: bool = False           # torch deterministic algorithms (bitwise resume)
    fsdp: bool = False                    # shard with FSDP2 (fully_shard) instead of DDP
    # checkpoints and logs
    resume: str | None = None             # "auto", a checkpoint file or a run folder
    overwrite: bool = False               # move an old run in ``output`` aside first
    keep_last: int = 3                    # run states kept (0: all)
    save_every_steps: int = 0             # also save a run state every N optimizer steps
    max_steps: int | None = None          # stop after this many optimizer steps in total
    progress: bool = True
    log_dir: str | None = None            # TensorBoard event files go here too
    # the command's other options (a task's data files, head sizes ...), kept for config.yaml
    command_options: dict = field(default_factory=dict)

    def replay_options(self) -> dict:
        """What ``config.yaml`` records to repeat this run: every field, the command's other
        options among them (a recipe overrides this where a resolved ``None`` means "off",
        which read back would mean "the recipe's")."""
        values = dataclasses.asdict(self)
        values.update(values.pop("command_options"))
        return values

    def architecture(self) -> dict:
        """Constructor keyword arguments given by the architecture fields (None = not set)."""
        arch = {k: getattr(self, k) for k in ("in_chans", "stem_stride") if getattr(self, k)}
        for k in ("depths", "dims"):
            if getattr(self, k):
                arch[k] = tuple(getattr(self, k))
        if self.v1_block:
            arch.update(block_kwargs(True))
        if self.drop_path is not None:
            arch["drop_path_rate"] = self.drop_path
        arch.update({k: v for k, v in self.model_kwargs.items() if v is not None})
        return arch


def check_run_config(cfg: RunConfig) -> None:
    """Refuse impossible run options up front, naming the flag and what it accepts."""
    def need(ok: bool, flag: str, accepted: str, value) -> None:
        if not ok:
            raise ValueError(f"--{flag} must be {accepted}, got {value}")

    need(cfg.workers >= 0, "workers", ">= 0", cfg.workers)
    need(cfg.accum_steps >= 1, "accum-steps", ">= 1", cfg.accum_steps)
    need(cfg.warmup_steps is None or cfg.warmup_steps >= 0, "warmup-steps",
         ">= 0 (0: no warmup)", cfg.warmup_steps)
    check_fraction(cfg.drop_path, "drop-path", closed=False, why=" (1 drops every block)")
    need(cfg.batch_size is None or cfg.batch_size >= 1, "batch-size", ">= 1", cfg.batch_size)
    need(cfg.img_size is None or cfg.img_size >= 1, "img-size", ">= 1", cfg.img_size)
    need(cfg.in_chans is None or cfg.in_chans >= 1, "in-chans", ">= 1", cfg.in_chans)
    need(cfg.stem_stride is None or cfg.stem_stride >= 1, "stem-stride", ">= 1", cfg.stem_stride)
    need(not cfg.depths or min(cfg.depths) >= 1, "depths", "four numbers >= 1",
         " ".join(map(str, cfg.depths or ())))
    need(not cfg.dims or min(cfg.dims) >= 1, "dims", "four numbers >= 1",
         " ".join(map(str, cfg.dims or ())))
    need(cfg.keep_last >= 0, "keep-last", ">= 0 (0 keeps every checkpoint)", cfg.keep_last)
    need(cfg.save_every_steps >= 0, "save-every-steps", ">= 0 (0: at epoch ends only)",
         cfg.save_every_steps)
    need(cfg.max_steps is None or cfg.max_steps >= 1, "max-steps", ">= 1", cfg.max_steps)
    need(cfg.grad_checkpointing in (None, *GRAD_CHECKPOINTING), "grad-checkpointing",
         "one of " + ", ".join(GRAD_CHECKPOINTING), cfg.grad_checkpointing)
    need((cfg.amp or "none") in AMP_MODES, "amp", "one of " + ", ".join(AMP_MODES), cfg.amp)
    if cfg.overwrite and cfg.resume:
        raise ValueError("--overwrite with --resume: one continues the run in --output, the "
                         "other moves it aside; pick one")


def check_fraction(value, flag: str, *, upper: float = 1.0, closed: bool = True,
                   why: str = "") -> None:
    """``value`` (None = the recipe's) must lie in [0, upper] (or [0, upper) if not closed)."""
    if value is None:
        return
    ok = 0.0 <= value <= upper if closed else 0.0 <= value < upper
    if not ok:
        bracket = "]" if closed else ")"
        raise ValueError(f"--{flag} must be in [0, {upper:g}{bracket}{why}, got {value}")


# -- resuming with other arguments --------------------------------------------------------------
def compare_resumed_args(saved: dict, now: dict, must_match: Sequence[str],
                         may_change: Sequence[str]) -> tuple[list[str], list[str]]:
    """Fields of a run's saved arguments that differ now: (refused, warned). Only fields the
    saved run recorded are compared (older checkpoints lack some)."""
    differ = lambda k: k in saved and k in now and plain(now[k]) != saved[k]  # noqa: E731
    show = lambda k: f"{k} ({saved[k]} -> {plain(now[k])})"  # noqa: E731
    return ([show(k) for k in must_match if differ(k)],
            [show(k) for k in may_change if differ(k)])


# namespace entries that are the parser's bookkeeping, not options of the run
_NOT_OPTIONS = ("command", "action", "analysis", "config")


def config_from_args(cls, args, **overrides):
    """``cls(**...)`` from an argparse namespace: every field with a same-named argument, so a
    new option needs a field and a flag, not a line here too. The command's other options go
    to ``command_options`` (recorded in ``config.yaml``, see ``training.replay``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["command_options"] = {k: v for k, v in vars(args).items()
                                 if k not in names and not k.startswith("_")
                                 and k not in _NOT_OPTIONS}
    values.update(overrides)
    return cls(**values)
