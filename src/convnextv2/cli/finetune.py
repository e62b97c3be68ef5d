from __future__ import annotations

from ._common import add_v1_block_argument

HELP = "Fine-tune a classifier (official ConvNeXt V2 recipe) or train a linear probe."
EPILOG = """examples:
  convnextv2 finetune --model atto --data builtin --output runs/ft --stem-stride 1 --epochs 10
  convnextv2 finetune --model convnextv2_tiny --data ~/imagenet --output runs/ft \\
      --finetune convnextv2_tiny_1k_224_fcmae.pt --recipe tiny --batch-size 64 --accum-iter 16
  convnextv2 finetune --data builtin --output runs/probe \\
      --finetune runs/fcmae/encoder.safetensors \\
      --linear-probe --epochs 5
  convnextv2 finetune ... --save-every-steps 500 --resume auto  # continue where it stopped
  torchrun --nproc_per_node 8 -m convnextv2 finetune ... --fsdp --no-model-ema

Every recipe value (--recipe atto|tiny|base|auto, SPEC section 3) can be overridden by its flag;
lr = blr * batch * accum / 256 unless --lr is given. A recipe's warmup longer than 20% of a
short run is capped at 20%. Writes metrics.jsonl, accuracy.png, loss.png, best.safetensors,
last.safetensors (native, with the class names), steps.jsonl (per-step loss),
checkpoint-<step>.pt run states and summary.json. Under torchrun it trains data-parallel
(--fsdp: sharded; checkpoints are still plain single-process files). Augmentation is keyed
by (seed, epoch, image) and mixup/cutmix by (seed, step): a run resumed mid-epoch repeats the
uninterrupted run's losses (exactly with --deterministic on CPU)."""


def add_arguments(p):
    from ..recipes.finetune import RECIPES
    p.add_argument("--model", default=None,
                   help="variant name (default: the --finetune checkpoint's stored config, "
                        "else convnextv2_atto)")
    p.add_argument("--data", required=True,
                   help="'builtin', an IDX folder, an ImageFolder tree (train/ and val/) or root")
    p.add_argument("--output", required=True, help="folder for checkpoints, metrics and curves")
    p.add_argument("--finetune", metavar="CKPT", help="start from this checkpoint (any layout)")
    p.add_argument("--recipe", default="auto", choices=RECIPES)
    p.add_argument("--linear-probe", action="store_true",
                   help="frozen encoder, BatchNorm1d(affine=False) + Linear head")
    g = p.add_argument_group("model")
    g.add_argument("--img-size", type=int, help="default 224; 32 for IDX / built-in data")
    g.add_argument("--in-chans", type=int, help="input channels (default: checkpoint's or 3)")
    g.add_argument("--stem-stride", type=int, help="stem kernel = stride (default 4)")
    g.add_argument("--depths", type=int, nargs=4, metavar="N")
    g.add_argument("--dims", type=int, nargs=4, metavar="D")
    add_v1_block_argument(g)
    g = p.add_argument_group("recipe overrides (default: from --recipe)")
    for flag, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("blr", float),
                       ("min-lr", float), ("warmup-epochs", float), ("weight-decay", float),
                       ("layer-decay", float), ("drop-path", float), ("smoothing", float),
                       ("mixup", float), ("cutmix", float), ("reprob", float),
                       ("model-ema-decay", float), ("clip-grad", float)):
        g.add_argument(f"--{flag}", type=kind)
    g.add_argument("--layer-decay-mode", choices=("single", "group"))
    g.add_argument("--aa", dest="auto_augment", help="RandAugment policy, or 'none'")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range (default 0.08 1)")
    g.add_argument("--model-ema", dest="model_ema", action="store_true", default=None)
    g.add_argument("--no-model-ema", dest="model_ema", action="store_false")
    g.add_argument("--model-ema-warmup", action="store_true",
                   help="timm's EMA decay warmup (useful for short runs)")
    g = p.add_argument_group("run")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                   help="autocast dtype (default: none)")
    g.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="cpu / cuda / auto (default: cuda when available)")
    g.add_argument("--resume", help="'auto' (newest run state in --output) or a checkpoint-*.pt")
    g.add_argument("--max-steps-per-epoch", type=int, help="cap batches per epoch (quick tests)")
    g.add_argument("--max-steps", type=int,
                   help="stop after N optimizer steps in total (saves a run state there)")
    g.add_argument("--save-every-steps", type=int, default=0, metavar="N",
                   help="also save a run state every N optimizer steps inside an epoch")
    g.add_argument("--keep-last", type=int, default=2, metavar="K",
                   help="keep the newest K run states (default 2; 0 keeps all)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic torch algorithms (bitwise-exact resume on CPU)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard with FSDP2 instead of DDP (needs --no-model-ema)")
    g.add_argument("--train-subset", type=int, help="train on N random images only")
    g.add_argument("--val-subset", type=int, help="evaluate on N random images only")
    g.add_argument("--strict-data", action="store_true", help="unreadable images are fatal")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def run(args) -> int:
    from ..recipes.finetune import FinetuneConfig, finetune
    from ..models.registry import block_kwargs

    model_kwargs = {k: getattr(args, k) for k in ("stem_stride", "depths", "dims")
                    if getattr(args, k) is not None}
    model_kwargs.update(block_kwargs(args.v1_block))
    model = args.model
    if model is None and not args.finetune:
        model = "convnextv2_atto"
    cfg = FinetuneConfig(
        model=model, data=args.data, output=args.output, finetune=args.finetune,
        recipe=args.recipe, model_kwargs=model_kwargs, img_size=args.img_size,
        in_chans=args.in_chans, linear_probe=args.linear_probe, accum_iter=args.accum_iter,
        amp=args.amp, workers=args.workers, seed=args.seed,
        device=args.device, resume=args.resume, max_steps_per_epoch=args.max_steps_per_epoch,
        train_subset=args.train_subset, val_subset=args.val_subset,
        strict_data=args.strict_data, progress=args.progress,
        max_steps=args.max_steps, save_every_steps=args.save_every_steps,
        keep_last=args.keep_last, deterministic=args.deterministic, fsdp=args.fsdp,
        model_ema_warmup=args.model_ema_warmup, crop_scale=tuple(args.crop_scale),
        **{k: getattr(args, k) for k in (
            "epochs", "batch_size", "lr", "blr", "min_lr", "warmup_epochs", "weight_decay",
            "layer_decay", "layer_decay_mode", "drop_path", "smoothing", "mixup", "cutmix",
            "reprob", "auto_augment", "model_ema", "model_ema_decay", "clip_grad")})
    try:
        summary = finetune(cfg)
    except FloatingPointError as e:  # non-finite loss: a training failure, not a usage error
        import sys
        print(f"convnextv2 finetune: stopped: {e}", file=sys.stderr)
        return 1
    if summary["rank"] == 0 and summary["best_epoch"] is None:  # --max-steps mid-epoch
        print(f"stopped at step {summary['global_step']} before an epoch ended; "
              f"--resume auto continues")
    elif summary["rank"] == 0:  # one line per run, not per torchrun process
        print(f"best top-1 {summary['best_top1']:.2f}% ({summary['best_source']} weights, "
              f"epoch {summary['best_epoch']}) in {summary['train_time_s']:.0f}s; wrote "
              f"{summary['best']}, {summary['last']}")
    return 0
