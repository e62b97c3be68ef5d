"""``convnextv2 reconstruct``: FCMAE reconstructions of images from a pretraining checkpoint."""
from __future__ import annotations

from pathlib import Path

HELP = "Draw FCMAE reconstructions (original | masked | reconstruction | pasted) of images."
EPILOG = """examples:
  convnextv2 reconstruct --checkpoint runs/fcmae/fcmae.safetensors cat.jpg dog.png
  convnextv2 reconstruct --checkpoint runs/fcmae/fcmae.safetensors img.png --mask-ratio 0.75 \\
      --seed 3 --img-size 224 --output recon.png

The checkpoint must hold the decoder: the fcmae.safetensors written by `convnextv2 pretrain`
(or one of its run states checkpoint-*.pt); encoder.safetensors alone cannot reconstruct."""


def add_arguments(p):
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of them")
    p.add_argument("--checkpoint", required=True, metavar="FCMAE_CKPT",
                   help="fcmae.safetensors (encoder + decoder)")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="fraction of patches removed (default: the checkpoint's, else 0.6)")
    p.add_argument("--seed", type=int, default=0, help="mask seed (default 0)")
    p.add_argument("--output", default="reconstruction.png", metavar="PNG")
    p.add_argument("--img-size", type=int, default=224,
                   help="input size, a multiple of the patch size (default 224)")


def run(args) -> int:
    import torch

    from ..analysis.reconstruction import save_reconstruction_grid
    from ..fcmae.io import load_fcmae
    from .analyze import load_image

    from ._guard import at_least, expand_images, writable_file

    if args.mask_ratio is not None and not 0.0 <= args.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    at_least("--img-size", args.img_size, 1)
    images = expand_images(args.images)
    writable_file(args.output)
    fcmae = _load(args.checkpoint, args.mask_ratio, load_fcmae)
    p = fcmae.patch_size
    if args.img_size % p:
        raise ValueError(f"--img-size {args.img_size} must be a multiple of the patch size {p} "
                         f"(e.g. {max(p, args.img_size // p * p)})")
    in_chans = fcmae.in_chans
    imgs = torch.stack([load_image(path, args.img_size, in_chans) for path in images])
    gen = torch.Generator().manual_seed(args.seed)
    mask = fcmae.random_mask(imgs, generator=gen)
    names = ", ".join(Path(x).name for x in images[:4]) + (" ..." if len(images) > 4 else "")
    path = save_reconstruction_grid(
        fcmae, imgs, mask, args.output, caption=f"{Path(args.checkpoint).name}: {names}, "
        f"mask ratio {fcmae.mask_ratio}, seed {args.seed}", max_images=len(images))
    print(f"wrote {path} ({len(images)} image(s), {int(mask[0].sum())} of {mask.shape[1]} "
          f"patches masked)")
    return 0


def _load(checkpoint, mask_ratio, load_fcmae):
    """``load_fcmae`` with a one-line error for a file that is no readable checkpoint (its
    pickle path is torch's, whose errors run over many lines)."""
    import pickle
    import warnings

    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (give the "
                                f"fcmae.safetensors that pretrain writes)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return load_fcmae(checkpoint, mask_ratio=mask_ratio)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError) as e:
        from ..checkpoint.io import _unpickler_reason  # torch's cause, not its unsafe advice
        cause = _unpickler_reason(str(e))[:200]
        raise ValueError(f"cannot read {checkpoint}: not a readable FCMAE checkpoint (truncated, "
                         f"corrupt, or a pickle that needs code, which is never run: {cause})"
                         ) from None
