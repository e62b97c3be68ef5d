from __future__ import annotations

from ._common import add_max_image_pixels_argument

HELP = "Classify images with a checkpoint: top-k class names with probabilities."
EPILOG = """examples:
  convnextv2 predict --checkpoint runs/ft/best.safetensors shoe.png shirt.jpg
  convnextv2 predict --checkpoint convnextv2_atto_1k_224_ema.pt --topk 3 cat.jpg

IMAGE may be a folder: the image files directly in it are read, in name order. A file that is
not a readable image stops the command with its name (nothing is guessed). Class names come
from the checkpoint (written by `finetune`), ImageNet's for 1000-class models, else the class
index. 16-bit images are scaled to 8 bits as in training."""


BATCH = 64  # images classified at once


def add_arguments(p):
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--key", help="entry of a training checkpoint to use: model_ema (official "
                                 "files), ema (finetune's checkpoint-*.pt run states)")
    p.add_argument("--model", help="variant name (optional; checked against the checkpoint)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of them")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--img-size", type=int, help="default: the checkpoint's, else 224")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu")
    add_max_image_pixels_argument(p)


def run(args) -> int:
    import json

    import torch

    from ..data import eval_transform, open_image
    from ..recipes.evaluate import class_names, load_classifier, predict
    from ._guard import at_least, check_img_size, expand_images, require_classifier

    at_least("--topk", args.topk, 1)
    at_least("--img-size", args.img_size, 1)
    paths = expand_images(args.images)
    model, info = load_classifier(args.checkpoint, args.model, key=args.key)
    require_classifier(model, args.checkpoint)
    img_size = int(args.img_size or info.get("img_size") or 224)
    check_img_size(img_size, model.config)
    model.to(args.device)
    names = class_names(model.config["num_classes"], info.get("class_names"))
    transform = eval_transform(img_size, model.config["in_chans"])
    # a folder may hold thousands of images: decode and classify them a batch at a time, and
    # print only when all are done, so an unreadable file never leaves half an answer behind
    results = []
    with torch.no_grad():
        for start in range(0, len(paths), BATCH):
            images = [open_image(p) for p in paths[start:start + BATCH]]  # one-line errors
            results += predict(model, images, transform, names, args.topk, args.device)
    if args.json:
        print(json.dumps([dict(image=str(p), top=[dict(label=c, probability=pr) for c, pr in r])
                          for p, r in zip(paths, results)]))
        return 0
    for path, top in zip(paths, results):
        print(path)
        for label, prob in top:
            print(f"  {prob * 100:6.2f}%  {label}")
    return 0
