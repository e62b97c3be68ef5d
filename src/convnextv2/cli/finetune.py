"""``convnextv2 finetune``: supervised fine-tuning and linear probing (see docs/recipes.md)."""
from __future__ import annotations

from ._common import (add_architecture_arguments, add_run_arguments,
                      add_shared_optimisation_arguments)

HELP = "Fine-tune a classifier (official ConvNeXt V2 recipe) or train a linear probe."
EPILOG = """examples:
  convnextv2 finetune --model atto --data builtin --output runs/ft --stem-stride 1 --epochs 10
  convnextv2 finetune --model convnextv2_tiny --data ~/imagenet --output runs/ft \\
      --finetune convnextv2_tiny_1k_224_fcmae.pt --recipe tiny --batch-size 64 --accum-steps 16
  convnextv2 finetune --data builtin --output runs/probe \\
      --finetune runs/fcmae/encoder.safetensors \\
      --linear-probe --epochs 5
  convnextv2 finetune ... --save-every-steps 500 --resume auto  # continue where it stopped
  torchrun --nproc_per_node 8 -m convnextv2 finetune ... --fsdp --no-model-ema
  convnextv2 finetune --data lists/train.csv ...       # rows path,label; val from lists/val.csv
  convnextv2 finetune --data /data/in1k-shards ...     # tar shards: train/*.tar and val/*.tar

Every preset value (--recipe, one per model size, docs/recipes.md) can be overridden by its
flag; lr = blr * batch * accum * processes / 256 unless --lr is given. A preset's warmup longer
than a quarter (25%) of a short run is capped at 25% unless --warmup-epochs is given. Writes
metrics.jsonl, accuracy.png, loss.png, best.safetensors and best_ema.safetensors (best model
and best EMA weights), last.safetensors (native, with the class names), steps.jsonl,
checkpoint-<step>.pt run states and summary.json. Under torchrun it trains data-parallel
(--fsdp: sharded; checkpoints are still plain single-process files). Augmentation is keyed
by (seed, epoch, image) and mixup/cutmix by (seed, step): a run resumed mid-epoch repeats the
uninterrupted run's losses (exactly with --deterministic on CPU)."""


def add_arguments(p):
    from ..recipes.finetune import FinetuneConfig
    from ..recipes.presets import RECIPES

    d = FinetuneConfig()
    p.add_argument("--model", default=None,
                   help="variant name (default: the --finetune checkpoint's stored config, "
                        "else convnextv2_atto)")
    p.add_argument("--data", required=True,
                   help="'builtin', an IDX folder, an ImageFolder tree (train/ and val/) or "
                        "root, a train.csv/.tsv list (val.csv beside it), or tar shards in "
                        "train/ and val/ folders (convnextv2 shards; docs/data_pipeline.md)")
    p.add_argument("--output", required=True,
                   help="run folder (created; one holding a run needs --resume or --overwrite)")
    p.add_argument("--finetune", metavar="CKPT", help="start from this checkpoint (any layout)")
    p.add_argument("--recipe", default="auto", choices=RECIPES,
                   help="preset of hyper-parameters (default auto: the preset of the variant "
                        "nearest to the model; docs/recipes.md)")
    p.add_argument("--linear-probe", action="store_true",
                   help="frozen encoder, BatchNorm1d(affine=False) + Linear head")
    g = p.add_argument_group("model")
    g.add_argument("--img-size", type=int, help="default 224; 32 for IDX / built-in data")
    add_architecture_arguments(g)
    g = p.add_argument_group("recipe overrides (default: from --recipe)")
    for flag, kind, what in (
            ("epochs", int, "training epochs"), ("batch-size", int, "images per process and "
                                                 "micro-batch"),
            ("lr", float, "absolute peak lr (overrides --blr)"),
            ("blr", float, "base lr per 256 images"), ("min-lr", float, "cosine floor"),
            ("warmup-epochs", float, "linear warmup"),
            ("weight-decay", float, "AdamW decay, >= 0"),
            ("layer-decay", float, "layer-wise lr decay, in (0, 1]"),
            ("smoothing", float, "label smoothing, in [0, 1)"),
            ("mixup", float, "mixup alpha (0: off)"), ("cutmix", float, "cutmix alpha (0: off)"),
            ("mixup-prob", float, "probability of mixing a batch, in [0, 1]"),
            ("mixup-switch-prob", float, "probability of cutmix instead of mixup, in [0, 1]"),
            ("reprob", float, "random-erasing probability, in [0, 1]"),
            ("recount", int, "random-erasing boxes per image"),
            ("color-jitter", float, "colour jitter (used only with --aa none, as in timm)"),
            ("crop-pct", float, "evaluation crop ratio, in (0, 1] (default: by image size)"),
            ("eps", float, "AdamW epsilon"),
            ("model-ema-decay", float, "EMA decay, in [0, 1]"),
            ("clip-grad", float, "max gradient norm")):
        g.add_argument(f"--{flag}", type=kind, help=what)
    add_shared_optimisation_arguments(g, warmup="--warmup-epochs", drop_path="the preset's")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="cutmix box size range as a fraction of the image (overrides alpha)")
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"),
                   help="mix per batch, per pair or per element")
    g.add_argument("--remode", choices=("const", "rand", "pixel"), help="random-erasing fill")
    g.add_argument("--layer-decay-mode", choices=("single", "group"),
                   help="layer ids per block, or in groups of three blocks (3-3-27-3 networks)")
    g.add_argument("--aa", dest="auto_augment", help="RandAugment policy, or 'none'")
    g.add_argument("--train-interpolation", choices=("bicubic", "bilinear", "random"),
                   help="resize interpolation of the training crop")
    g.add_argument("--crop-scale", type=float, nargs=2, default=d.crop_scale,
                   metavar=("MIN", "MAX"), help="RandomResizedCrop area range (default 0.08 1)")
    g.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"),
                   help="AdamW betas (default 0.9 0.999)")
    g.add_argument("--model-ema", dest="model_ema", action="store_true", default=None,
                   help="keep and evaluate an EMA of the weights (the presets do)")
    g.add_argument("--no-model-ema", dest="model_ema", action="store_false",
                   help="no EMA (needed with --fsdp)")
    g.add_argument("--model-ema-warmup", action="store_true",
                   help="timm's EMA decay warmup (useful for short runs)")
    g = p.add_argument_group("run")
    g.add_argument("--max-steps-per-epoch", type=int, help="cap batches per epoch (quick tests)")
    g.add_argument("--train-subset", type=int, help="train on N random images only (>= 1)")
    g.add_argument("--val-subset", type=int, help="evaluate on N random images only (>= 1)")
    add_run_arguments(g, d)


def run(args) -> int:
    from ..recipes.finetune import FinetuneConfig, finetune
    from ..training import config_from_args

    summary = finetune(config_from_args(FinetuneConfig, args, crop_scale=tuple(args.crop_scale)))
    if summary["rank"] == 0 and summary["best_epoch"] is None:  # --max-steps mid-epoch
        print(f"stopped at step {summary['global_step']} before an epoch ended; "
              f"--resume auto continues")
    elif summary["rank"] == 0:  # one line per run, not per torchrun process
        print(f"best top-1 {summary['best_top1']:.2f}% ({summary['best_source']} weights, "
              f"epoch {summary['best_epoch']}) in {summary['train_time_s']:.0f}s; wrote "
              f"{summary['best']}, {summary['last']}")
    return 0
