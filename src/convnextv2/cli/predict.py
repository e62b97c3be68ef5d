from __future__ import annotations

HELP = "Classify images with a checkpoint: top-k class names with probabilities."
EPILOG = """examples:
  convnextv2 predict --checkpoint runs/ft/best.safetensors shoe.png shirt.jpg
  convnextv2 predict --checkpoint convnextv2_atto_1k_224_ema.pt --topk 3 cat.jpg

Class names come from the checkpoint (written by `finetune`), ImageNet's for 1000-class models,
else the class index."""


def add_arguments(p):
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--key", help="entry of a training checkpoint to use: model_ema (official "
                                 "files), ema (finetune's checkpoint-*.pt run states)")
    p.add_argument("--model", help="variant name (optional; checked against the checkpoint)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--img-size", type=int, help="default: the checkpoint's, else 224")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    import json
    from pathlib import Path

    from ..data import eval_transform
    from ..recipes.evaluate import class_names, load_classifier, predict

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image: {', '.join(missing)}")
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    model, info = load_classifier(args.checkpoint, args.model, key=args.key)
    model.to(args.device)
    img_size = int(args.img_size or info.get("img_size") or 224)
    names = class_names(model.config["num_classes"], info.get("class_names"))
    results = predict(model, args.images, eval_transform(img_size, model.config["in_chans"]),
                      names, args.topk, args.device)
    if args.json:
        print(json.dumps([dict(image=str(p), top=[dict(label=c, probability=pr) for c, pr in r])
                          for p, r in zip(args.images, results)]))
        return 0
    for path, top in zip(args.images, results):
        print(path)
        for label, prob in top:
            print(f"  {prob * 100:6.2f}%  {label}")
    return 0
