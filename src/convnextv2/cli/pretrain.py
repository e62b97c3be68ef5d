"""``convnextv2 pretrain``: FCMAE self-supervised pretraining (see docs/pretraining.md)."""
from __future__ import annotations

import sys

from ._common import add_v1_block_argument

HELP = "FCMAE masked-image pretraining of a ConvNeXt V2 encoder (official recipe by default)."
EPILOG = """examples:
  convnextv2 pretrain --model convnextv2_atto --data ./images --output runs/fcmae
  convnextv2 pretrain --model atto --data builtin --in-chans 1 --img-size 32 --stem-stride 1 \\
      --epochs 10 --batch-size 64 --output runs/fmnist
  convnextv2 pretrain ... --resume auto            # continue the newest checkpoint in --output
  torchrun --nproc_per_node 4 -m convnextv2 pretrain --model tiny --data /imagenet --amp bf16 ...
  torchrun --nproc_per_node 8 -m convnextv2 pretrain --model huge --fsdp ...   # see docs/distributed.md

--data: an ImageFolder tree (train/ is used), a class-folder root or a plain folder of images
(labels are ignored), a Fashion-MNIST IDX folder, or 'builtin' (packaged Fashion-MNIST subset).
lr = blr * batch * accum * processes / 256 unless --lr is given."""


def add_arguments(p):
    from ..recipes.pretrain import RECIPE, PretrainConfig

    d = PretrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"encoder variant (default {d.model})")
    g.add_argument("--in-chans", type=int, default=d.in_chans, help="input channels (default 3)")
    g.add_argument("--stem-stride", type=int, default=None,
                   help="stem kernel = stride (default 4; patch size = 8 x this)")
    g.add_argument("--depths", type=int, nargs=4, default=None, metavar="N",
                   help="custom blocks per stage (overrides the variant's)")
    g.add_argument("--dims", type=int, nargs=4, default=None, metavar="C",
                   help="custom stage widths (overrides the variant's)")
    add_v1_block_argument(g)
    g.add_argument("--decoder-dim", type=int, default=d.decoder_dim, help="decoder width (512)")
    g.add_argument("--decoder-depth", type=int, default=d.decoder_depth, help="decoder blocks (1)")
    g.add_argument("--mask-ratio", type=float, default=d.mask_ratio, help="masked fraction (0.6)")
    g.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                   help="regress raw pixels instead of per-patch normalised ones")
    g.add_argument("--backend", choices=("sparse", "dense"), default=d.backend,
                   help="sparse encoder (default) or masked dense convolution")

    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=d.data, help="image folder, IDX folder or 'builtin'")
    g.add_argument("--output", required=True, help="run folder (created; must be writable)")
    g.add_argument("--img-size", type=int, default=d.img_size,
                   help="crop size, a multiple of the patch size (default 224)")
    g.add_argument("--workers", type=int, default=d.workers, help="data-loader workers (2)")
    g.add_argument("--strict-data", action="store_true",
                   help="unreadable images are fatal (default: skipped, counted in metrics)")

    g = p.add_argument_group("optimisation (SPEC section 3 defaults)")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per process and micro-batch (default 64)")
    g.add_argument("--accum-steps", type=int, default=d.accum_steps,
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--blr", type=float, default=d.blr, help="base lr per 256 images (1.5e-4)")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="cosine floor (0)")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear warmup (default {RECIPE['warmup_epochs']}, capped at a quarter "
                        f"of --epochs for short runs)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay (0.05)")
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (off)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=d.amp,
                   help="mixed precision (bf16 works on CPU and GPU; fp16 GPU only)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state with "
                        "FSDP2 instead of DDP (large/huge); checkpoints are still full files")

    g = p.add_argument_group("run control")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of order, crops and masks (0)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch deterministic algorithms (a resumed run repeats the losses)")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto' = newest checkpoint in --output; or a checkpoint file")
    g.add_argument("--save-every-steps", type=int, default=0, metavar="N",
                   help="also checkpoint every N optimizer steps (default: epochs only)")
    g.add_argument("--keep-last", type=int, default=d.keep_last,
                   help="checkpoints kept (default 3; 0 keeps all)")
    g.add_argument("--recon-every", type=int, default=d.recon_every, metavar="EPOCHS",
                   help="reconstruction figure every N epochs (default 10; 0: only at the end)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (schedule unchanged)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")


def run(args) -> int:
    from ..recipes.pretrain import NonFiniteLossError, PretrainConfig, pretrain

    fields = PretrainConfig.__dataclass_fields__
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        pretrain(cfg)
    except NonFiniteLossError as e:
        print(f"convnextv2 pretrain: {e}", file=sys.stderr)
        return 1
    return 0
