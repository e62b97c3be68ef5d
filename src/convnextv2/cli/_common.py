"""Options shared by several subcommands.

The four training commands (``pretrain``, ``finetune``, ``detect train``, ``segment train``)
take the same run options and the same shared optimisation options, with the same names,
defaults and help: their configs share ``training.config.RunConfig``, and the argparse
destinations are the config field names, so ``config_from_args`` fills a config without a
list of fields to copy. Options renamed over time stay as hidden aliases that still work and
say, in one line on stderr, which name replaced them.
"""
from __future__ import annotations

import argparse
import sys

from ..models.model import GRAD_CHECKPOINTING
from ..training.config import RunConfig
from ._config_file import add_config_argument


class _DeprecatedAlias(argparse.Action):
    """A hidden old option name: stores into the new option's destination (or nowhere, when
    ``replacement`` says the value is no longer used) after a one-line note on stderr."""

    def __init__(self, option_strings, dest, replacement: str = "", **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; {self.replacement}",
              file=sys.stderr)
        if not self.dest.startswith("_ignored"):
            setattr(namespace, self.dest, values)


def add_deprecated_alias(group, old: str, new: str | None, *, dest: str | None = None,
                         note: str | None = None, **kwargs) -> None:
    """``old`` as a hidden alias of option ``new`` (destination ``dest``, by default the new
    option's), or, with ``new=None``, an accepted old option whose value is ignored (``note``
    says why)."""
    if new is None:
        dest, replacement = f"_ignored_{old.lstrip('-').replace('-', '_')}", f"ignored: {note}"
    else:
        dest = dest or new.lstrip("-").replace("-", "_")
        replacement = f"use {new}" + (f" ({note})" if note else "")
    group.add_argument(old, dest=dest, action=_DeprecatedAlias, replacement=replacement,
                       default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def add_v1_block_argument(group) -> None:
    group.add_argument("--v1-block", action="store_true",
                       help="ConvNeXt V1 block for ablations: no GRN, layer scale 1e-6")


def add_architecture_arguments(group, in_chans_default: str = "the checkpoint's, else 3") -> None:
    """How both classification recipes reshape a variant (small images, custom sizes, the V1
    ablation)."""
    group.add_argument("--in-chans", type=int, default=None,
                       help=f"input channels (default: {in_chans_default})")
    group.add_argument("--stem-stride", type=int, default=None,
                       help="stem kernel = stride (default 4; patch size = 8 x this)")
    group.add_argument("--depths", type=int, nargs=4, default=None, metavar="N",
                       help="custom blocks per stage (overrides the variant's)")
    group.add_argument("--dims", type=int, nargs=4, default=None, metavar="C",
                       help="custom stage widths (overrides the variant's)")
    add_v1_block_argument(group)


def add_shared_optimisation_arguments(group, warmup: str = "the recipe's",
                                      drop_path: str = "the recipe's") -> None:
    """Gradient accumulation, warmup in steps and stochastic depth: every training command
    has them, under these names (``warmup`` / ``drop_path``: what the defaults are)."""
    group.add_argument("--accum-steps", type=int, default=RunConfig.accum_steps, metavar="N",
                       help="micro-batches per optimizer step (gradient accumulation, "
                            "default 1)")
    add_deprecated_alias(group, "--accum-iter", "--accum-steps", type=int)
    group.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                       help=f"linear warmup over N optimizer steps (default: {warmup}; "
                            f"0: none)")
    add_deprecated_alias(group, "--warmup-iters", "--warmup-steps", type=int)
    group.add_argument("--drop-path", type=float, default=None, metavar="RATE",
                       help=f"stochastic depth rate, in [0, 1) (default: {drop_path})")
    add_deprecated_alias(group, "--drop-path-rate", "--drop-path", type=float)


def add_run_arguments(group, defaults, *, fsdp: bool = True, strict_data: bool = True) -> None:
    """Execution, checkpoint and logging options, and ``--config`` (a run's config.yaml as
    the defaults); ``defaults`` is the recipe's config.
    ``fsdp`` / ``strict_data``: whether the command offers those (detection and segmentation
    train data-parallel only, and their data readers always refuse a bad file)."""
    d = defaults
    add_config_argument(group, type(d))
    group.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:N or auto (default: this process's GPU if any)")
    group.add_argument("--workers", type=int, default=d.workers,
                       help=f"data-loader worker processes (default {d.workers})")
    group.add_argument("--amp", choices=("none", "bf16", "fp16"), default=d.amp,
                       help="mixed precision (bf16 works on CPU and GPU; fp16 GPU only; "
                            "default none)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model (on a GPU: with --amp bf16 the fastest "
                            "setting; the first steps are slow while it compiles)")
    group.add_argument("--grad-checkpointing", nargs="?", const="block", default=None,
                       choices=GRAD_CHECKPOINTING, metavar="block|stage",
                       help="recompute activations in backward instead of keeping them: "
                            "several times less activation memory for a slower step (base at "
                            "224 on the CPU: 6-25x less kept, 1.2-1.5x the time; "
                            "docs/benchmarks.md); 'block' (the default when "
                            "given) or 'stage' (least memory); same loss and gradients")
    if fsdp:
        group.add_argument("--fsdp", action="store_true",
                           help="under torchrun: shard weights, gradients and optimizer state "
                                "with FSDP2 instead of DDP; checkpoints are still full files")
    group.add_argument("--seed", type=int, default=d.seed,
                       help="seed of the order, augmentation, masks and init (default 0)")
    group.add_argument("--deterministic", action="store_true",
                       help="torch deterministic algorithms (a resumed run repeats the losses "
                            "bit for bit on the CPU)")
    if strict_data:
        group.add_argument("--strict-data", action="store_true",
                           help="unreadable images are fatal (default: skipped and counted)")
        add_max_image_pixels_argument(group)
    _add_checkpoint_arguments(group)
    group.add_argument("--log-dir", default=None, metavar="DIR",
                       help="also write TensorBoard events there (loss, lr, img/s, "
                            "evaluation, images); needs the tensorboard package")
    group.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar")


def _add_checkpoint_arguments(group) -> None:
    """Resume, overwrite, checkpoint frequency, keep-last and the step limit."""
    group.add_argument("--resume", default=None, metavar="auto|PATH",
                       help="'auto': the newest intact checkpoint in --output (none: start "
                            "fresh); or a checkpoint-*.pt file or run folder")
    group.add_argument("--overwrite", action="store_true",
                       help="--output already holds a run: move it aside to "
                            "<output>.old-<time> (nothing is deleted) and start fresh")
    group.add_argument("--save-every-steps", type=int, default=RunConfig.save_every_steps,
                       metavar="N", help="also save a run state every N optimizer steps "
                                         "(default: at epoch ends only)")
    add_deprecated_alias(group, "--save-interval", "--save-every-steps", type=int)
    keep = RunConfig.keep_last
    group.add_argument("--keep-last", type=int, default=keep, metavar="K",
                       help=f"run states kept, newest first (default {keep}; 0 keeps all)")
    group.add_argument("--max-steps", type=int, default=None, metavar="N",
                       help="stop after N optimizer steps in total and save (the schedule is "
                            "unchanged; --resume auto continues)")


def add_max_image_pixels_argument(group) -> None:
    """``--max-image-pixels N``: the header-checked size limit of ``data/image_limits.py``
    (every command that reads user images takes it; ``apply_max_image_pixels`` sets it)."""
    from ..data.image_limits import DEFAULT_MAX_IMAGE_PIXELS

    group.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                       help=f"refuse images with more than N pixels (width x height), read "
                            f"from their header before decoding (default "
                            f"{DEFAULT_MAX_IMAGE_PIXELS:,}, Pillow's limit)")


def apply_max_image_pixels(args) -> None:
    """Set the process's image size limit from ``--max-image-pixels``, or back to the default
    where the command was not given it (each command starts from the default, also when
    ``main`` runs several in one process); before any data is opened or a DataLoader worker
    forked."""
    from ..data.image_limits import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels

    value = getattr(args, "max_image_pixels", None)
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS if value is None else value)
