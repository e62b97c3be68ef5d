"""Options shared by several subcommands.

``pretrain`` and ``finetune`` take the same architecture and run options with the same names,
defaults and help (their configs share ``training.config.RunConfig``); the argparse
destinations are the config field names, so ``config_from_args`` fills a config without a
list of fields to copy.
"""


def add_v1_block_argument(group) -> None:
    group.add_argument("--v1-block", action="store_true",
                       help="ConvNeXt V1 block for ablations: no GRN, layer scale 1e-6")


def add_architecture_arguments(group, in_chans_default: str = "the checkpoint's, else 3") -> None:
    """How both recipes reshape a variant (small images, custom sizes, the V1 ablation)."""
    group.add_argument("--in-chans", type=int, default=None,
                       help=f"input channels (default: {in_chans_default})")
    group.add_argument("--stem-stride", type=int, default=None,
                       help="stem kernel = stride (default 4; patch size = 8 x this)")
    group.add_argument("--depths", type=int, nargs=4, default=None, metavar="N",
                       help="custom blocks per stage (overrides the variant's)")
    group.add_argument("--dims", type=int, nargs=4, default=None, metavar="C",
                       help="custom stage widths (overrides the variant's)")
    add_v1_block_argument(group)


def add_run_arguments(group, defaults) -> None:
    """Execution, checkpoint and logging options; ``defaults`` is the recipe's config."""
    d = defaults
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
    group.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard weights, gradients and optimizer state with "
                            "FSDP2 instead of DDP; checkpoints are still full files")
    group.add_argument("--seed", type=int, default=d.seed,
                       help="seed of the order, augmentation, masks and init (default 0)")
    group.add_argument("--deterministic", action="store_true",
                       help="torch deterministic algorithms (a resumed run repeats the losses "
                            "bit for bit on the CPU)")
    group.add_argument("--strict-data", action="store_true",
                       help="unreadable images are fatal (default: skipped and counted)")
    group.add_argument("--resume", default=None, metavar="auto|PATH",
                       help="'auto': the newest intact checkpoint in --output (none: start "
                            "fresh); or a checkpoint-*.pt file or run folder")
    group.add_argument("--overwrite", action="store_true",
                       help="--output already holds a run: move it aside to "
                            "<output>.old-<time> (nothing is deleted) and start fresh")
    group.add_argument("--save-every-steps", type=int, default=0, metavar="N",
                       help="also save a run state every N optimizer steps (default: at "
                            "epoch ends only)")
    group.add_argument("--keep-last", type=int, default=d.keep_last, metavar="K",
                       help=f"run states kept, newest first (default {d.keep_last}; 0 keeps "
                            f"all)")
    group.add_argument("--max-steps", type=int, default=None, metavar="N",
                       help="stop after N optimizer steps in total and save (the schedule is "
                            "unchanged; --resume auto continues)")
    group.add_argument("--log-dir", default=None, metavar="DIR",
                       help="also write TensorBoard events there (loss, lr, img/s, "
                            "evaluation, images); needs the tensorboard package")
    group.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar")
