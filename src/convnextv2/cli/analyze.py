"""``convnextv2 analyze collapse|activations``: the paper's feature analyses from checkpoints."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

HELP = "Feature-collapse curves and per-channel activation maps of trained or random models."
EPILOG = """examples:
  convnextv2 analyze collapse --checkpoint runs/v1/encoder.safetensors runs/v2/encoder.safetensors \\
      random:convnextv2_atto --labels V1 V2 random --data builtin --images 64 --img-size 32 \\
      --output collapse/
  convnextv2 analyze collapse --checkpoint "random:atto,use_grn=False,layer_scale_init_value=1e-6" \\
      random:atto --data ./images --images 32
  convnextv2 analyze activations --checkpoint model.safetensors --image cat.jpg \\
      --layer stages.2.blocks.3.pwconv1 --output act.png

--checkpoint takes a file in any layout the checkpoint module reads, an FCMAE file
(fcmae.safetensors: its encoder is used) or random:NAME[,key=value...] for a randomly
initialised reference (keys: any create_model override, e.g. use_grn, stem_stride, in_chans)."""

RANDOM_PREFIX = "random:"


def add_arguments(p):
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    sub.required = True
    c = sub.add_parser("collapse", help="feature cosine distance of every block output, one "
                       "line per checkpoint (paper Fig. 4)")
    c.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                   help="checkpoints to compare (files or random:NAME[,key=value...])")
    c.add_argument("--data", required=True, help="image folder, ImageFolder/IDX folder or 'builtin'")
    c.add_argument("--images", type=int, default=64, metavar="N", help="images to average over (default 64)")
    c.add_argument("--img-size", type=int, default=224, help="input size (default 224)")
    c.add_argument("--split", default="val", choices=("train", "val"), help="dataset split (default val)")
    c.add_argument("--labels", nargs="+", default=None, help="legend names, one per checkpoint")
    c.add_argument("--output", default="collapse", metavar="DIR",
                   help="folder for collapse.json and collapse.png (default ./collapse)")
    c.add_argument("--site", default="block", choices=("block", "expansion"),
                   help="block: each block's output (default); expansion: the 4x-wide MLP "
                        "activation entering pwconv2 (after GELU and GRN)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--seed", type=int, default=0, help="image choice and random-init weights")
    a = sub.add_parser("activations", help="grid of the channel maps of one layer (paper Fig. 3)")
    a.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a checkpoint file or random:NAME[,key=value...]")
    a.add_argument("--image", required=True, help="an image file")
    a.add_argument("--layer", required=True, metavar="NAME",
                   help="module name, e.g. stages.2.blocks.3 or stages.2.blocks.3.pwconv1")
    a.add_argument("--output", default=None, metavar="PNG",
                   help="output figure (default activations_<layer>.png)")
    a.add_argument("--max-channels", type=int, default=64)
    a.add_argument("--img-size", type=int, default=224)
    a.add_argument("--seed", type=int, default=0, help="random-init weights")


def run(args) -> int:
    if args.analysis == "collapse":
        return run_collapse(args)
    return run_activations(args)


# -- loading -----------------------------------------------------------------------------------
def parse_random_source(source: str) -> tuple[str, dict]:
    """``random:NAME[,key=value...]`` -> (NAME, overrides); values are Python literals."""
    # split at commas that start a new ``key=``, so tuple values such as (1,1,1,1) stay whole
    name, *pairs = re.split(r",(?=\s*\w+\s*=)", source[len(RANDOM_PREFIX):])
    if "," in name:
        raise ValueError(f"{source!r}: expected random:NAME,key=value,... (e.g. "
                         f"random:convnextv2_atto,use_grn=False)")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{source!r}: expected key=value after the model name, got {pair!r}")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{source!r}: {value!r} is not a Python literal (e.g. False, 1e-6, "
                             f"(1,1,1,1))") from None
    return name, overrides


def load_encoder(source: str, seed: int = 0):
    """A ConvNeXtV2 from a checkpoint path, a released name (``convnextv2_base.fcmae``), an
    FCMAE file (its encoder) or ``random:NAME``."""
    import torch

    from ..models.registry import create_model
    if source.startswith(RANDOM_PREFIX):
        name, overrides = parse_random_source(source)
        torch.manual_seed(seed)
        try:
            return create_model(name, **overrides)
        except TypeError as e:
            raise ValueError(f"{source!r}: {e}") from None
    from ..checkpoint import resolve_checkpoint

    path = Path(resolve_checkpoint(source))  # a released name: fetched
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (give a file, or "
                                f"random:NAME for a randomly initialised model)")
    if _is_fcmae_file(path):
        from ..fcmae.io import load_fcmae
        return load_fcmae(path).encoder
    from ..checkpoint import load_model
    return load_model(str(path))


def _is_fcmae_file(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("format") == "convnextv2-fcmae"


def default_label(source: str) -> str:
    if source.startswith(RANDOM_PREFIX):
        return f"random {source[len(RANDOM_PREFIX):]}"
    path = Path(source)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def load_image(path: str, img_size: int, in_chans: int):
    from PIL import UnidentifiedImageError

    from ..data import eval_transform, open_image
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} does not exist")
    try:
        img = open_image(p)  # 16-bit images scaled to 8 bits, as in training
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {p}: {' '.join(str(e).split())}") from None
    return eval_transform(img_size, in_chans)(img)


# -- collapse ----------------------------------------------------------------------------------
def run_collapse(args) -> int:
    from ..analysis.collapse import collapse_profile, sample_images, save_collapse_plot

    from ._guard import at_least, writable_folder

    labels = args.labels or [default_label(s) for s in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        raise ValueError(f"--labels gives {len(labels)} names for {len(args.checkpoint)} checkpoints")
    for flag, value in (("--images", args.images), ("--img-size", args.img_size),
                        ("--batch-size", args.batch_size)):
        at_least(flag, value, 1)
    out = writable_folder(args.output)
    images_by_chans: dict[int, object] = {}
    results = []
    for source, label in zip(args.checkpoint, labels):
        model = load_encoder(source, args.seed)
        chans = model.config["in_chans"]
        if chans not in images_by_chans:
            images_by_chans[chans] = sample_images(args.data, args.images, args.img_size, chans,
                                                   args.split, args.seed)
        profile = collapse_profile(model, images_by_chans[chans], args.batch_size,
                                   progress=True, site=args.site)
        mean = sum(profile["scores"]) / len(profile["scores"])
        results.append(dict(label=label, checkpoint=source, config=_plain(model.config),
                            mean_score=mean, **profile))
        print(f"{label:<30} blocks {len(profile['scores']):>3}  mean {mean:.4f}  "
              f"first {profile['scores'][0]:.4f}  last {profile['scores'][-1]:.4f}")
    where = ("block outputs" if args.site == "block"
             else "the expansion activations entering pwconv2")
    summary = dict(data=str(args.data), split=args.split, images=args.images,
                   img_size=args.img_size, seed=args.seed, site=args.site,
                   metric=f"1/C^2 sum_ij (1 - cos(X_i, X_j)) / 2 over {where}, "
                          "averaged over images", models=results)
    (out / "collapse.json").write_text(json.dumps(summary, indent=2))
    save_collapse_plot(results, labels, out / "collapse.png",
                       title=f"feature cosine distance at {where}\n{args.images} images of "
                             f"{args.data}, {args.img_size} px")
    print(f"wrote {out / 'collapse.json'} and {out / 'collapse.png'}")
    return 0


def _plain(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


# -- activations -------------------------------------------------------------------------------
def run_activations(args) -> int:
    from ..analysis.activations import layer_activation, save_activation_grid

    from ._guard import at_least, writable_file

    at_least("--max-channels", args.max_channels, 1)
    at_least("--img-size", args.img_size, 1)
    output = writable_file(args.output or f"activations_{args.layer.replace('.', '_')}.png")
    model = load_encoder(args.checkpoint, args.seed)
    image = load_image(args.image, args.img_size, model.config["in_chans"])
    act = layer_activation(model, image, args.layer)
    save_activation_grid(act, output, title=f"{default_label(args.checkpoint)}: {args.layer} "
                                           f"on {Path(args.image).name}",
                         max_channels=args.max_channels)
    print(f"{args.layer}: {act.shape[0]} channels of {act.shape[1]}x{act.shape[2]}; wrote {output}")
    return 0
