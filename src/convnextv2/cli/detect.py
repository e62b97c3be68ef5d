"""``convnextv2 detect train|eval|predict``: Mask R-CNN / Faster R-CNN on a ConvNeXt V2
backbone, on COCO-format data."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Object detection and instance segmentation (Mask R-CNN) with a ConvNeXt V2 backbone."
EPILOG = """examples:
  convnextv2 detect train --data builtin --output runs/det --model convnextv2_atto --epochs 12
  convnextv2 detect train --data /data/coco --output runs/maskrcnn_tiny \\
      --model convnextv2_tiny --pretrained convnextv2_tiny_1k_224_ema.pt --amp bf16
  torchrun --nproc_per_node 8 -m convnextv2 detect train --data /data/coco --output runs/m \\
      --model convnextv2_base --pretrained base.pt --batch-size 4 --amp bf16
  convnextv2 detect eval --checkpoint runs/det/model.pt --data /data/coco
  convnextv2 detect predict --checkpoint runs/det/model.pt photo.jpg --output preds/

--data ROOT is a COCO layout: ROOT/annotations/instances_train2017.json with ROOT/train2017/
and instances_val2017.json with val2017/ (any instances_<split>*.json works), or 'builtin':
synthetic Fashion-MNIST scenes, generated once. Defaults are the ConvNeXt V2 COCO recipe
(Mask R-CNN 3x: 36 epochs, AdamW lr 1e-4, wd 0.05, layer decay 0.95, drop path 0.4, large-
scale jitter at 1024, lr / 10 at epochs 27 and 33); see docs/transfer.md."""

BUILTIN_DEFAULTS = dict(img_size=128, scale_range=(0.75, 1.25), anchor_sizes=(8, 16, 32, 64, 128),
                        epochs=12, batch_size=4, lr=1e-3, drop_path=0.0, layer_decay=0.9,
                        schedule="cosine", warmup_iters=20, fpn_channels=64, box_head_dim=256,
                        mask_head_dim=64, depths=(1, 1, 2, 1), dims=(24, 48, 96, 192),
                        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
                        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                        box_batch_size_per_image=32, box_positive_fraction=0.5,
                        box_detections_per_img=20, roi_canonical_scale=48, eval_batch_size=8)


# -- options shared with ``convnextv2 segment`` ---------------------------------------------
def add_backbone_options(p, recipe: dict) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--model", help="backbone variant (convnextv2_atto ... _huge); default: the "
                                   "shape of --pretrained, else convnextv2_tiny")
    g.add_argument("--pretrained", metavar="CKPT",
                   help="backbone weights: an FCMAE encoder.safetensors from 'convnextv2 "
                        "pretrain', a fine-tuned classifier, official/timm/HF files or hub id")
    g.add_argument("--drop-path", type=float, help=f"stochastic depth (recipe {recipe['drop_path']})")
    g.add_argument("--depths", type=int, nargs=4, help="custom backbone depths")
    g.add_argument("--dims", type=int, nargs=4, help="custom backbone widths")


def add_run_options(p, recipe: dict, length: str) -> None:
    g = p.add_argument_group("optimisation (default: the paper's recipe)")
    if length == "epochs":
        g.add_argument("--epochs", type=int, help=f"training epochs (recipe {recipe['epochs']})")
        g.add_argument("--iters", type=int, help="training length in steps instead of epochs")
    else:
        g.add_argument("--iters", type=int, help=f"training steps (recipe {recipe['iters']})")
        g.add_argument("--epochs", type=int, help="training length in epochs instead of steps")
    g.add_argument("--batch-size", type=int, help=f"images per process (recipe {recipe['batch_size']} "
                                                  f"on each of {'16' if length == 'epochs' else '1'} GPUs)")
    g.add_argument("--lr", type=float, help=f"peak AdamW lr (recipe {recipe['lr']})")
    g.add_argument("--weight-decay", type=float, help=f"(recipe {recipe['weight_decay']})")
    g.add_argument("--layer-decay", type=float,
                   help=f"backbone lr decay rate (recipe {recipe['layer_decay']}; 1 = off)")
    g.add_argument("--layer-decay-mode", choices=("layer_wise", "stage_wise"),
                   help=f"(recipe {recipe['layer_decay_mode']})")
    g.add_argument("--num-layers", type=int,
                   help="layer count of the decay rule (default 3 + ceil(depths[2] / 3): 6 for "
                        "tiny, 12 for base and larger)")
    g.add_argument("--schedule", choices=("poly", "step", "cosine"),
                   help=f"(recipe {recipe['schedule']})")
    g.add_argument("--warmup-iters", type=int, help=f"linear warmup steps (recipe {recipe['warmup_iters']})")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    g = p.add_argument_group("run")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision (fp16 needs a GPU)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: GPU when there is one)")
    g.add_argument("--workers", type=int, default=2, help="data-loader processes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", metavar="auto|PATH",
                   help="'auto' continues the newest checkpoint in --output; or a checkpoint")
    g.add_argument("--eval-interval", type=int, help="steps between evaluations "
                                                     "(default: every epoch / a tenth of the run)")
    g.add_argument("--save-interval", type=int, help="steps between checkpoints (default: with "
                                                     "each evaluation)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def pick(args, name: str, *defaults):
    """The first set value of ``args.name`` and ``defaults``."""
    value = getattr(args, name, None)
    for d in defaults:
        if value is not None:
            break
        value = d.get(name) if isinstance(d, dict) else d
    return value


def transfer_config(args, recipe: dict, builtin: dict | None):
    from ..transfer.engine import TransferConfig

    d = [builtin or {}, recipe]
    epochs, iters = args.epochs, args.iters
    if epochs is None and iters is None:  # the length comes from one place, not a mix
        source = next(x for x in d if x.get("epochs") or x.get("iters"))
        epochs, iters = source.get("epochs"), source.get("iters")
    depths, dims = pick(args, "depths", builtin or {}), pick(args, "dims", builtin or {})
    if (depths or dims) and args.model:
        raise ValueError("give either --model or --depths/--dims, not both")
    model = args.model
    if model is None and args.pretrained is None and not (depths and dims):
        model = "convnextv2_tiny"
    if (depths is None) != (dims is None):
        raise ValueError("--depths and --dims go together (four numbers each)")
    return TransferConfig(
        output=args.output, data=args.data, model=model, pretrained=args.pretrained,
        depths=depths if args.pretrained is None else None,
        dims=dims if args.pretrained is None else None,
        drop_path=pick(args, "drop_path", *d), epochs=epochs, iters=iters,
        batch_size=pick(args, "batch_size", *d),
        eval_batch_size=pick(args, "eval_batch_size", builtin or {}, 1),
        lr=pick(args, "lr", *d), weight_decay=pick(args, "weight_decay", *d),
        layer_decay=pick(args, "layer_decay", *d),
        layer_decay_mode=pick(args, "layer_decay_mode", *d), num_layers=args.num_layers,
        schedule=pick(args, "schedule", *d), warmup_iters=pick(args, "warmup_iters", *d),
        warmup_ratio=recipe["warmup_ratio"], min_lr=args.min_lr, clip_grad=args.clip_grad,
        amp=args.amp, device=args.device, workers=args.workers, seed=args.seed,
        resume=args.resume, eval_interval=args.eval_interval, save_interval=args.save_interval,
        keep_last=args.keep_last, max_steps=args.max_steps, progress=args.progress)


def set_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def check_images(paths) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        out.append(path)
    return out


def new_png(folder: Path, image: Path) -> Path:
    target = folder / f"{image.stem}.png"
    if target.exists():
        raise ValueError(f"{target} already exists; predictions never overwrite files, pick "
                         f"another --output")
    return target


def print_metrics(metrics: dict, keys) -> None:
    width = max(len(k) for k in keys)
    for k in keys:
        if k in metrics:
            print(f"  {k:<{width}}  {metrics[k]:6.2f}")


def add_eval_options(e, batch_size: int) -> None:
    """The options ``detect eval`` and ``segment eval`` share (besides checkpoint and data)."""
    e.add_argument("--batch-size", type=int, default=batch_size)
    e.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    e.add_argument("--device")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--json", metavar="FILE", help="also write the metrics to this new file")
    e.add_argument("--threads", type=int)
    e.add_argument("--no-progress", dest="progress", action="store_false")


def add_predict_options(r) -> None:
    """The options ``detect predict`` and ``segment predict`` share."""
    r.add_argument("--checkpoint", required=True, help="a run's model.pt (or the run folder)")
    r.add_argument("images", nargs="+", help="image files")
    r.add_argument("--output", required=True, help="folder for the PNGs")
    r.add_argument("--device")
    r.add_argument("--threads", type=int)


def write_json(path, metrics: dict) -> None:
    """``--json FILE``: the metrics as JSON, never over an existing file."""
    if not path:
        return
    path = Path(path)
    if path.exists():
        raise ValueError(f"--json {path} already exists; give a new file name")
    path.write_text(json.dumps(metrics, indent=2))


def predict_images(args, load, draw, describe) -> int:
    """The ``predict`` loop both transfer commands share: ``load(checkpoint) -> (model,
    classes)``, ``draw(model, pixels, classes, device) -> (picture, found)``, and
    ``describe(found) -> str`` for the line printed per image. Every target name is checked
    before the model runs on that image, so an existing PNG is never replaced."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from ..training.distributed import pick_device

    images = check_images(args.images)
    model, classes = load(args.checkpoint)
    device = pick_device(args.device)
    model.to(device)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in images:
        target = new_png(out, path)
        try:
            pixels = F.pil_to_tensor(Image.open(path).convert("RGB"))
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        drawn, found = draw(model, pixels, classes, device)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
        print(f"{path} -> {target}: {describe(found)}")
    return 0


# -- the command ----------------------------------------------------------------------------
def add_arguments(p):
    from ..detection.train import RECIPE

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a detector", description="Train Mask R-CNN.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--data", required=True, help="COCO root, or 'builtin'")
    t.add_argument("--output", required=True, help="new run folder")
    _add_data_overrides(t, ("train", "val"))
    add_backbone_options(t, RECIPE)
    g = t.add_argument_group("detector")
    g.add_argument("--no-masks", dest="masks", action="store_false",
                   help="Faster R-CNN (boxes only) instead of Mask R-CNN")
    g.add_argument("--img-size", type=int, help=f"training crop and test size (recipe {RECIPE['img_size']})")
    g.add_argument("--scale-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="large-scale jitter factors (recipe 0.1 2.0)")
    g.add_argument("--no-jitter", action="store_true", help="train on the images as they are")
    g.add_argument("--fpn-channels", type=int, help="FPN width (256)")
    g.add_argument("--anchor-sizes", type=int, nargs=5, help="one anchor size per FPN level "
                                                             "(32 64 128 256 512)")
    g.add_argument("--box-head-dim", type=int, help="box head MLP width (1024)")
    g.add_argument("--mask-head-dim", type=int, help="mask head conv width (256)")
    add_run_options(t, RECIPE, "epochs")
    t.set_defaults(_action=_train)

    e = sub.add_parser("eval", help="COCO box and mask mAP of a trained detector",
                       description="COCO box and mask mAP of a trained detector.")
    e.add_argument("--checkpoint", required=True, help="a run's model.pt (or the run folder)")
    e.add_argument("--data", help="COCO root (its val split), or 'builtin'")
    _add_data_overrides(e, ("val",))
    add_eval_options(e, batch_size=2)
    e.set_defaults(_action=_eval)

    r = sub.add_parser("predict", help="draw detections on images (PNG)",
                       description="Draw boxes, class names, scores and masks on images.")
    add_predict_options(r)
    r.add_argument("--score-thresh", type=float, default=0.5)
    r.set_defaults(_action=_predict)


def _add_data_overrides(p, splits) -> None:
    g = p.add_argument_group("explicit files (instead of, or on top of, --data)")
    for s in splits:
        g.add_argument(f"--{s}-images", help=f"{s} image folder")
        g.add_argument(f"--{s}-ann", help=f"{s} COCO instances JSON")


def run(args) -> int:
    set_threads(args)
    return args._action(args)


def _data(args, splits=("train", "val")):
    from ..detection.train import DetectionData, find_coco

    found = None
    if args.data == "builtin":
        from ..transfer.synthetic import builtin_scenes
        r = builtin_scenes()["detection"]
        found = DetectionData(r / "train", r / "annotations/instances_train.json",
                              r / "val", r / "annotations/instances_val.json")
    elif args.data:
        explicit = all(getattr(args, f"{s}_{k}", None) for s in splits for k in ("images", "ann"))
        if not explicit:
            found = find_coco(args.data)
    values = {}
    for s in splits:
        for k in ("images", "ann"):
            v = getattr(args, f"{s}_{k}", None) or (getattr(found, f"{s}_{k}") if found else None)
            if v is None:
                raise ValueError(f"no {s} data: give --data ROOT or --{s}-images and --{s}-ann")
            values[f"{s}_{k}"] = Path(v)
    if "train_images" not in values:
        values.update(train_images=values["val_images"], train_ann=values["val_ann"])
    return DetectionData(**values)


def _train(args) -> int:
    from ..detection.train import RECIPE, DetectionTask
    from ..transfer.engine import train

    builtin = BUILTIN_DEFAULTS if args.data == "builtin" else None
    d = [builtin or {}, RECIPE]
    cfg = transfer_config(args, RECIPE, builtin)
    detector = {k: getattr(args, k) for k in ("fpn_channels", "anchor_sizes", "box_head_dim",
                                               "mask_head_dim") if getattr(args, k) is not None}
    if builtin:
        detector = {**{k: v for k, v in builtin.items() if k.startswith(("rpn_", "box_", "fpn",
                                                                         "anchor", "mask_head",
                                                                         "roi_"))},
                    **detector}
    scale_range = None if args.no_jitter else pick(args, "scale_range", *d)
    task = DetectionTask(_data(args), img_size=pick(args, "img_size", *d),
                         scale_range=scale_range, masks=args.masks, detector_kwargs=detector)
    train(task, cfg)
    return 0


def _eval(args) -> int:
    from ..detection.data import CocoDetection, collate, eval_transforms
    from ..detection.evaluate import evaluate_detector
    from ..training.dist_eval import sharded_loader
    from ..detection.model import detector_from_config
    from ..training.distributed import cleanup_distributed, init_distributed
    from ..transfer.engine import read_model_file

    data = _data(args, ("val",))
    ckpt = read_model_file(args.checkpoint, "detection")
    info = init_distributed(args.device)
    try:
        ds = CocoDetection(data.val_images, data.val_ann, eval_transforms(),
                           masks=ckpt["config"].get("masks", True))
        if len(ds.classes) != ckpt["config"]["num_classes"]:
            raise ValueError(f"{data.val_ann.name} has {len(ds.classes)} categories but the "
                             f"model was trained on {ckpt['config']['num_classes']}")
        model = detector_from_config(ckpt["config"])
        model.load_state_dict(ckpt["model"])
        model.to(info.device)
        loader = sharded_loader(ds, info, batch_size=args.batch_size, collate_fn=collate,
                                num_workers=args.workers)
        metrics = evaluate_detector(model, loader, ds, info.device, args.amp, info,
                                    progress=args.progress)
    finally:
        cleanup_distributed()
    if info.is_main:
        print(f"{len(ds)} images of {data.val_ann.name}:")
        print_metrics(metrics, [k for k in metrics if "AR" not in k])
        write_json(args.json, metrics)
    return 0


def _predict(args) -> int:
    from ..detection.visualize import load_detector, predict_and_draw

    return predict_images(
        args, load_detector,
        lambda model, pixels, classes, device: predict_and_draw(model, pixels, classes,
                                                                args.score_thresh, device),
        lambda found: f"{len(found)} objects" + "".join(
            f"\n  {n} {s:.2f}  box {[round(v) for v in b]}" for n, s, b in found))
