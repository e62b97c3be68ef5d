"""``convnextv2 pretrain``: FCMAE self-supervised pretraining (see docs/pretraining.md)."""
from __future__ import annotations

from ._common import (add_architecture_arguments, add_deprecated_alias, add_run_arguments,
                      add_shared_optimisation_arguments)

HELP = "FCMAE masked-image pretraining of a ConvNeXt V2 encoder (official recipe by default)."
EPILOG = """examples:
  convnextv2 pretrain --model convnextv2_atto --data ./images --output runs/fcmae
  convnextv2 pretrain --model atto --data builtin --in-chans 1 --img-size 32 --stem-stride 1 \\
      --epochs 10 --batch-size 64 --output runs/fmnist
  convnextv2 pretrain ... --resume auto            # continue the newest checkpoint in --output
  convnextv2 pretrain ... --monitor-data ./labelled --monitor-every 5   # k-NN + collapse
  convnextv2 pretrain --model tiny --init tiny_in1k.safetensors --freeze-encoder --epochs 20 \\
      --data ./images --output runs/decoder     # a decoder for a given encoder
  torchrun --nproc_per_node 4 -m convnextv2 pretrain --model tiny --data /imagenet --amp bf16 ...
  torchrun --nproc_per_node 8 -m convnextv2 pretrain --model huge --fsdp ...  # docs/distributed.md
  convnextv2 pretrain --model base --data /imagenet --amp bf16 --decode device --workers 4 ...
  torchrun --nproc_per_node 8 -m convnextv2 pretrain --data '/data/in1k-{000000..001023}.tar' ...

--data: an ImageFolder tree (train/ is used), a class-folder root or a plain folder of images
(labels are ignored), a Fashion-MNIST IDX folder, 'builtin' (packaged Fashion-MNIST subset), a
.csv/.tsv list of images, or WebDataset tar shards: 'shards-{000000..000099}.tar', a folder of
.tar files, or a .txt list of them (write them with `convnextv2 shards`; docs/data_pipeline.md).
lr = blr * batch * accum * processes / 256 unless --lr is given."""


def add_arguments(p):
    from ..recipes.presets import PRETRAIN as RECIPE
    from ..recipes.pretrain import PretrainConfig

    d = PretrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"encoder variant (default {d.model})")
    add_architecture_arguments(g, in_chans_default="3")
    g.add_argument("--decoder-dim", type=int, default=d.decoder_dim, help="decoder width (512)")
    add_deprecated_alias(g, "--decoder-embed-dim", "--decoder-dim", type=int)
    g.add_argument("--decoder-depth", type=int, default=d.decoder_depth, help="decoder blocks (1)")
    g.add_argument("--mask-ratio", type=float, default=d.mask_ratio,
                   help="masked fraction of the patches, in (0, 1) (default 0.6)")
    g.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                   help="regress raw pixels instead of per-patch normalised ones")
    g.add_argument("--backend", choices=("sparse", "dense"), default=d.backend,
                   help="sparse encoder (default) or masked dense convolution")
    g.add_argument("--sparse-dwconv", choices=("grid", "triton"), default=d.sparse_dwconv,
                   help="the sparse encoder's depthwise 7x7: 'grid' (default; cuDNN/oneDNN on a "
                        "zero-filled map) or 'triton' (kernels that compute visible sites only; "
                        "CUDA with Triton, elsewhere 'grid')")
    g.add_argument("--init", metavar="CKPT",
                   help="start from these weights: an FCMAE file with its decoder (ours, or an "
                        "official FCMAE .pth) or any encoder checkpoint (decoder then fresh)")
    g.add_argument("--freeze-encoder", action="store_true",
                   help="with --init: train only the decoder and mask token on the encoder's "
                        "features (the encoder stays bit-identical), e.g. to fit a decoder to "
                        "timm, HF or official fine-tuned weights before `reconstruct`")

    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=d.data,
                   help="image folder, IDX folder, 'builtin', .csv/.tsv list or tar shards "
                        "(pattern, folder of .tar, .txt list)")
    g.add_argument("--output", required=True,
                   help="run folder (created; one holding a run needs --resume or --overwrite)")
    g.add_argument("--img-size", type=int, default=d.img_size,
                   help="crop size, a multiple of the patch size (default 224)")
    g.add_argument("--decode", choices=("cpu", "device"), default=d.decode,
                   help="where training images are decoded and augmented: 'cpu' (default; "
                        "in the --workers processes) or 'device' (JPEGs decoded in batches on "
                        "the training device, nvJPEG on CUDA; workers only read files and draw "
                        "the same crops and flips; RGB image folders only; docs/data_pipeline.md)")
    g.add_argument("--recon-every", type=int, default=d.recon_every, metavar="EPOCHS",
                   help="reconstruction figure every N epochs (default 10; 0: only at the end)")

    g = p.add_argument_group("monitor: is the encoder learning? (docs/pretraining.md)")
    g.add_argument("--monitor-data", default=None, metavar="DIR",
                   help="a small labelled ImageFolder (train/ and val/, or class folders: 20%% "
                        "held out), or 'builtin': k-NN accuracy (k=20, DINO's weighting) and "
                        "feature collapse per stage of the encoder, at the start and every "
                        "--monitor-every epochs, in metrics.jsonl, TensorBoard and monitor.png")
    g.add_argument("--monitor-every", type=int, default=d.monitor_every, metavar="EPOCHS",
                   help=f"epochs between the probes (default {d.monitor_every})")
    g.add_argument("--monitor-images", type=int, default=d.monitor_images, metavar="N",
                   help=f"at most N bank and N query images (default {d.monitor_images}); the "
                        f"cost of a probe grows with it")

    g = p.add_argument_group("optimisation (the official recipe by default; docs/recipes.md)")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per process and micro-batch (default 64)")
    g.add_argument("--blr", type=float, default=d.blr, help="base lr per 256 images (1.5e-4)")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="cosine floor (0)")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear warmup (default {RECIPE['warmup_epochs']}, capped at a quarter "
                        f"of --epochs for short runs)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW decay, >= 0 (0.05)")
    g.add_argument("--wd-exempt", choices=("official", "grn"), default=d.wd_exempt,
                   help="parameters without weight decay: 'official' (default) biases and "
                        "1-D tensors, so GRN and the mask token ARE decayed, as in the "
                        "official code; 'grn' also exempts GRN gamma/beta and the mask token")
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (off)")
    add_shared_optimisation_arguments(g, warmup="--warmup-epochs", drop_path="0")

    add_run_arguments(p.add_argument_group("run control"), d)


def run(args) -> int:
    from ..recipes.pretrain import PretrainConfig, pretrain
    from ..training import config_from_args

    pretrain(config_from_args(PretrainConfig, args))
    return 0
