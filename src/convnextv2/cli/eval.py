from __future__ import annotations

from ._common import add_max_image_pixels_argument

HELP = "Evaluate a classifier: top-1, top-5, per-class accuracy and a confusion matrix."
EPILOG = """examples:
  convnextv2 eval --checkpoint runs/ft/best.safetensors --data builtin
  convnextv2 eval --model convnextv2_atto --checkpoint atto_1k.pt --data ~/imagenet --json
  convnextv2 eval --checkpoint best.safetensors --data ./images --output runs/eval

The image size and channels default to those stored in a checkpoint written by `finetune`
(else 224 px). The confusion matrix PNG goes to --output (default: next to the checkpoint)."""


def add_arguments(p):
    p.add_argument("--key", help="entry of a training checkpoint to use: model_ema (official "
                                 "files), ema (finetune's checkpoint-*.pt run states)")
    p.add_argument("--model", help="variant name (optional for native checkpoints; checked "
                                   "against the checkpoint's architecture)")
    p.add_argument("--checkpoint", required=True, help="weights in any supported layout")
    p.add_argument("--data", required=True, help="'builtin', IDX folder or ImageFolder tree")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--img-size", type=int)
    p.add_argument("--crop-pct", type=float, help="eval resize/crop ratio (default: recipe)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None)
    add_max_image_pixels_argument(p)
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="none")
    p.add_argument("--output", help="folder for confusion_matrix.png and eval.json")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args) -> int:
    import json
    from pathlib import Path

    from ..data import build_dataset, eval_transform
    from ..recipes.evaluate import class_names, load_classifier, plot_confusion
    from ..recipes.finetune_config import default_img_size as _default_img_size

    from ._guard import check_img_size, require_classifier

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--img-size", args.img_size, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    model, info = load_classifier(args.checkpoint, args.model, key=args.key)
    require_classifier(model, args.checkpoint)
    in_chans = model.config["in_chans"]
    img_size = args.img_size or info.get("img_size") or _default_img_size(args.data)
    check_img_size(int(img_size), model.config)
    ds = build_dataset(args.data, args.split, eval_transform(int(img_size), in_chans,
                                                             args.crop_pct), labelled=True)
    num_classes = model.config["num_classes"]
    if len(ds.classes) != num_classes:
        raise ValueError(f"{args.data} has {len(ds.classes)} classes but the model has "
                         f"{num_classes} outputs")
    _warn_on_other_class_names(info.get("class_names"), ds.classes, args.checkpoint, args.data)
    out = Path(args.output) if args.output else Path(args.checkpoint).resolve().parent
    from ..recipes.pretrain import check_output_writable
    check_output_writable(out)  # before the work: a clear error instead of a lost evaluation
    # under torchrun each rank evaluates an unpadded share and the sums are all-reduced,
    # so every image counts exactly once; rank 0 alone prints and writes
    from ..training import cleanup_distributed, init_distributed
    from ..training.dist_eval import evaluate_distributed, sharded_loader
    world = init_distributed(args.device)
    device = world.device
    model.to(device)
    loader = sharded_loader(ds, world, batch_size=args.batch_size, num_workers=args.workers)
    try:
        res = evaluate_distributed(model, loader, num_classes, device, args.amp,
                                   progress=not args.json and world.is_main)
    finally:
        cleanup_distributed()
    if not world.is_main:
        return 0
    names = class_names(num_classes, info.get("class_names") or ds.classes)
    png = plot_confusion(res["confusion"], names, out / "confusion_matrix.png",
                         title=f"{Path(args.checkpoint).name} on {args.data} ({args.split})")
    report = dict(checkpoint=str(args.checkpoint), data=str(args.data), split=args.split,
                  img_size=int(img_size), count=res["count"], loss=res["loss"],
                  top1=res["top1"], top5=res["top5"],
                  per_class_top1=dict(zip(names, res["per_class_top1"])),
                  confusion=res["confusion"], classes=names, confusion_png=str(png),
                  skipped_images=getattr(ds, "num_skipped", 0))
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{res['count']} images: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
          f"loss {res['loss']:.4f}")
    width = max(len(n) for n in names)
    for name, acc in zip(names[:50], res["per_class_top1"][:50]):
        print(f"  {name:<{width}}  {'-' if acc is None else f'{acc:6.2f}%'}")
    if len(names) > 50:
        print(f"  ... {len(names) - 50} more classes in {out / 'eval.json'}")
    print(f"confusion matrix: {png}")
    return 0


def _warn_on_other_class_names(stored, found, checkpoint, data) -> None:
    """Warn when the data's classes are not the ones the model was trained on.

    Labels are class indices, so a different name at an index (another dataset, a renamed or
    missing folder shifting the sorted order) silently scores the wrong class. Folder names
    cannot hold "/", so "T-shirt/top" and "T-shirt_top" count as the same name.
    """
    import sys

    if not stored or not found:
        return
    def norm(names):
        return [str(n).replace("/", "_") for n in names]
    if norm(stored) == norm(found):
        return
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(stored, found)) if norm([a]) != norm([b])]
    i, a, b = diff[0] if diff else (min(len(stored), len(found)), "-", "-")
    print(f"convnextv2 eval: warning: the class names of {data} differ from those stored in "
          f"{checkpoint} ({len(diff)} of {len(stored)}; first at index {i}: data {b!r}, "
          f"checkpoint {a!r}); labels are matched by index", file=sys.stderr)
