from __future__ import annotations

from ..models.variants import list_models, resolve_name

HELP = ("Show a model's layout, parameter count and multiply-accumulates (GMACs), or the "
        "released pretrained weights.")
EPILOG = """examples:
  convnextv2 info                                # table of all variants at 224 px
  convnextv2 info --model convnextv2_tiny --img-size 384
  convnextv2 info --model atto --img-size 32 --stem-stride 1 --in-chans 1 --num-classes 10
  convnextv2 info --pretrained                   # every released checkpoint, by name
  convnextv2 info --pretrained '*_384'           # those matching a pattern
  convnextv2 info --pretrained convnextv2_tiny.fcmae_ft_in1k   # one: URL, hub ids, mean/std

A released name works wherever a checkpoint is taken: create_model(NAME, pretrained=True),
finetune --finetune, pretrain --init, eval/predict --checkpoint, detect/segment --pretrained.
Weights come from the Hugging Face Hub (its cache), else the official URL (docs/pretrained.md)."""


def add_arguments(p):
    p.add_argument("--model", help="variant name (default: all of them): " + ", ".join(list_models()))
    p.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="N",
                   help="input size: N for square, or H W (default 224)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default 1000)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default 3)")
    p.add_argument("--stem-stride", type=int, default=None, help="stem kernel = stride (default 4)")
    p.add_argument("--pretrained", nargs="?", const="*", default=None, metavar="PATTERN",
                   help="list the released weights (all, or those whose name matches PATTERN, "
                        "e.g. tiny or '*_384') instead of the variants")


def run(args) -> int:
    if args.pretrained is not None:
        return show_pretrained(args.pretrained)
    from ..tools.stats import model_stats

    if len(args.img_size) not in (1, 2):
        raise ValueError(f"--img-size takes N or H W, got {args.img_size}")
    if min(args.img_size) < 1:
        raise ValueError(f"--img-size must be positive, got {args.img_size}")
    if args.num_classes is not None and args.num_classes < 0:
        raise ValueError(f"--num-classes must be >= 0 (0: no classifier head), got "
                         f"{args.num_classes}")
    if args.in_chans is not None and args.in_chans < 1:
        raise ValueError(f"--in-chans must be >= 1, got {args.in_chans}")
    size = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    overrides = dict(num_classes=args.num_classes, in_chans=args.in_chans,
                     stem_stride=args.stem_stride)
    names = [resolve_name(args.model)] if args.model else list_models()
    stride = (args.stem_stride or 4) * 8
    for s in (size if isinstance(size, tuple) else (size,)):
        if s < stride or s % stride:
            print(f"note: {s} px is not a multiple of the total stride {stride}; "
                  f"the last stage map is {s // stride} px wide")
    print(f"{'model':<18} {'depths':<12} {'dims':<22} {'params':>10} {'GMACs':>9}")
    for name in names:
        st = model_stats(name, size, **overrides)
        cfg = st["config"]
        print(f"{name:<18} {','.join(map(str, cfg['depths'])):<12} "
              f"{','.join(map(str, cfg['dims'])):<22} {st['params'] / 1e6:>9.2f}M "
              f"{st['macs'] / 1e9:>9.3f}")
    if len(names) == 1:
        feats = ", ".join(f"{f['module']}: {f['num_chs']} ch / stride {f['reduction']}"
                          for f in st["feature_info"])
        print(f"input {size} px; feature maps: {feats}")
    return 0


def show_pretrained(pattern: str) -> int:
    """The catalogue as a table (no torch, no network), or one entry in full."""
    from ..checkpoint.catalog import CATALOG, list_pretrained

    names = list_pretrained(pattern)
    if not names:
        raise ValueError(f"--pretrained {pattern!r} matches no released weights; names look "
                         f"like convnextv2_tiny.fcmae_ft_in1k (try --pretrained tiny)")
    if len(names) == 1:
        e = CATALOG[names[0]]
        for label, value in (("name", e.name), ("official URL", e.url), ("timm hub id", e.hub_id),
                             ("HF transformers id", e.hf_id or "none (timm only)"),
                             ("classes", e.num_classes or "none (FCMAE encoder, no head)"),
                             ("input size", f"{e.input_size} px"),
                             ("eval crop", f"crop_pct {e.crop_pct} ({e.crop_mode}, "
                                           f"{e.interpolation})"),
                             ("mean / std", f"{e.mean} / {e.std}"),
                             ("paper top-1", f"{e.top1}%" if e.top1 else "-"),
                             ("licence", e.license)):
            print(f"{label + ':':<20} {value}")
        return 0
    print(f"{'name':<42} {'px':>4} {'crop':>6} {'top-1':>6}  HF transformers id")
    for name in names:
        e = CATALOG[name]
        top1 = f"{e.top1:.1f}" if e.top1 else "-"
        print(f"{name:<42} {e.input_size:>4} {e.crop_pct:>6} {top1:>6}  {e.hf_id or '-'}")
    print(f"{len(names)} released checkpoints (timm hub id: timm/NAME; top-1: ImageNet-1K, "
          f"from the paper); details: convnextv2 info --pretrained NAME")
    return 0
