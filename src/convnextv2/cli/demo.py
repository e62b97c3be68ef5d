from __future__ import annotations

HELP = "Built-in demo: FCMAE-pretrain, fine-tune and compare with training from scratch."
EPILOG = """examples:
  convnextv2 demo                       # ~5 min on 2 idle CPU cores, longer when busy
  convnextv2 demo --output runs/demo --quick

On the packaged Fashion-MNIST subset: FCMAE pretraining of a small ConvNeXt V2 (32 px, stem
stride 1, 8 px mask patches), then, for each of 3 seeds, fine-tuning of that encoder and
training of the same architecture from scratch with the same budget (a small-image, short
recipe: RandomCrop with padding 4, no RandAugment/mixup/erasing). Prints mean ± std per arm
and whether FCMAE's gain exceeds the seed spread, and writes OUTPUT/report/
(reconstruction.png, pretrain_loss.png, pretrain_monitor.png: the encoder's k-NN accuracy
and feature collapse during pretraining, finetune_curves.png, metrics.json, table.md). An
OUTPUT that already holds a run is left alone: the demo writes to OUTPUT-2, OUTPUT-3, ..."""


def add_arguments(p):
    p.add_argument("--task", choices=("classification", "detection", "segmentation"),
                   default="classification",
                   help="classification (default); detection: Mask R-CNN, segmentation: "
                        "UPerNet, each on synthetic Fashion-MNIST scenes, FCMAE-pretrained "
                        "vs from scratch (about 5 minutes each)")
    p.add_argument("--pretrained", metavar="ENCODER",
                   help="detection/segmentation: reuse this encoder instead of pretraining")
    p.add_argument("--output", default="runs/demo", help="folder for runs and the report")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds)")
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--seed", type=int, default=0,
                   help="pretraining seed; fine-tuning uses SEED .. SEED+SEEDS-1")
    p.add_argument("--seeds", type=int, help="fine-tuning seeds per arm (default 3)")
    p.add_argument("--threads", type=int, help="torch threads for pretraining (on a busy shared "
                                                "machine 1 can be much faster than 2); the "
                                                "fine-tuning runs use 1 each, two at a time")


def run(args) -> int:
    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: automatic), got {args.threads}")
    if args.task != "classification":
        return _run_transfer(args)
    from ..demos.classification import DemoConfig, run_demo

    cfg = DemoConfig.quick_config(args.output) if args.quick else DemoConfig(output=args.output)
    cfg.seed, cfg.threads = args.seed, args.threads
    if args.pretrain_epochs:
        cfg.pretrain_epochs = args.pretrain_epochs
    if args.finetune_epochs:
        cfg.finetune_epochs = args.finetune_epochs
    if args.seeds is not None:
        cfg.seeds = args.seeds
    run_demo(cfg)
    return 0


def _run_transfer(args) -> int:
    """``convnextv2 demo --task detection|segmentation``; the default output is named after
    the task."""
    from ..demos.transfer import TransferDemoConfig, run_transfer_demo

    output = args.output if args.output != "runs/demo" else f"runs/demo_{args.task}"
    cfg = (TransferDemoConfig.quick_config(args.task, output) if args.quick
           else TransferDemoConfig(task=args.task, output=output))
    cfg.seed, cfg.threads, cfg.pretrained = args.seed, args.threads, args.pretrained
    if args.pretrain_epochs:
        cfg.pretrain_epochs = args.pretrain_epochs
    run_transfer_demo(cfg)
    return 0
