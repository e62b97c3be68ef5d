"""``convnextv2 detect train|eval|predict``: Mask R-CNN / Faster R-CNN on a ConvNeXt V2
backbone, on COCO-format data."""
from __future__ import annotations

from pathlib import Path

from ._common import add_max_image_pixels_argument
from ._transfer import (LENGTH_HELP, add_backbone_options, add_eval_options,
                        add_predict_options, add_train_parser, add_training_options,
                        check_new_json, evaluate_run, pick, plan_pngs, predict_images,
                        transfer_config, write_json)
from ._transfer import run  # noqa: F401  (the command's entry point, shared with segment)

HELP = "Object detection and instance segmentation (Mask R-CNN) with a ConvNeXt V2 backbone."
EPILOG = """examples:
  convnextv2 detect train --data builtin --output runs/det --model convnextv2_atto --epochs 12
  convnextv2 detect train --data /data/coco --output runs/maskrcnn_tiny \\
      --model convnextv2_tiny --pretrained convnextv2_tiny_1k_224_ema.pt --amp bf16
  torchrun --nproc_per_node 8 -m convnextv2 detect train --data /data/coco --output runs/m \\
      --model convnextv2_base --pretrained base.pt --batch-size 4 --amp bf16
  convnextv2 detect eval --checkpoint runs/det/model.pt --data /data/coco
  convnextv2 detect predict --checkpoint runs/det/model.pt photo.jpg --output preds/
  convnextv2 detect predict --checkpoint runs/det/model.pt /data/coco/val2017 --output preds/ \
      --json preds/results.json --ann /data/coco/annotations/instances_val2017.json

--data ROOT is a COCO layout: ROOT/annotations/instances_train2017.json with ROOT/train2017/
and instances_val2017.json with val2017/ (any instances_<split>*.json works), or 'builtin':
synthetic Fashion-MNIST scenes, generated once. Defaults are the ConvNeXt V2 COCO recipe
(Mask R-CNN 3x: 36 epochs, AdamW lr 1e-4, wd 0.05, layer decay 0.95, drop path 0.4, large-
scale jitter at 1024, lr / 10 at epochs 27 and 33); see docs/transfer.md.

""" + LENGTH_HELP


# -- the command ----------------------------------------------------------------------------
def add_arguments(p):
    from ..recipes.presets import DETECTION_RECIPE as RECIPE

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = add_train_parser(sub, "detector", "Mask R-CNN", "COCO root, or 'builtin'", EPILOG)
    _add_data_overrides(t, ("train", "val"))
    add_backbone_options(t)
    g = t.add_argument_group("detector")
    g.add_argument("--no-masks", dest="masks", action="store_false",
                   help="Faster R-CNN (boxes only) instead of Mask R-CNN")
    g.add_argument("--img-size", type=int,
                   help=f"training crop and test size (recipe {RECIPE['img_size']})")
    g.add_argument("--scale-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="large-scale jitter factors (recipe 0.1 2.0)")
    g.add_argument("--no-jitter", action="store_true", help="train on the images as they are")
    g.add_argument("--fpn-channels", type=int, help="FPN width (256)")
    g.add_argument("--anchor-sizes", type=int, nargs=5, help="one anchor size per FPN level "
                                                             "(32 64 128 256 512)")
    g.add_argument("--box-head-dim", type=int, help="box head MLP width (1024)")
    g.add_argument("--mask-head-dim", type=int, help="mask head conv width (256)")
    add_max_image_pixels_argument(g)
    add_training_options(t, RECIPE, gpus=16)
    t.set_defaults(_action=_train)

    e = sub.add_parser("eval", help="COCO box and mask mAP of a trained detector",
                       description="COCO box and mask mAP of a trained detector.")
    e.add_argument("--checkpoint", required=True, help="a run's model.pt (or the run folder)")
    e.add_argument("--data", help="COCO root (its val split), or 'builtin'")
    _add_data_overrides(e, ("val",))
    add_eval_options(e, batch_size=2)
    add_max_image_pixels_argument(e)
    e.set_defaults(_action=_eval)

    r = sub.add_parser("predict", help="draw detections on images (PNG), optionally as COCO "
                                       "results JSON",
                       description="Draw boxes, class names, scores and masks on images; "
                                   "--json also writes every detection as COCO results.")
    add_predict_options(r)
    r.add_argument("--score-thresh", type=float, default=0.5,
                   help="lowest score drawn (default 0.5; --json keeps every detection)")
    r.add_argument("--json", metavar="FILE",
                   help="also write COCO results (image_id, category_id, bbox x, y, w, h, "
                        "score, RLE segmentation) to this new file, for any COCO scorer")
    r.add_argument("--ann", metavar="FILE",
                   help="with --json: the COCO instances file of the images, whose image ids "
                        "(matched by file name) and category ids the results use (default: "
                        "ids from numeric file names, as COCO's 000000397133.jpg, and the "
                        "training file's category ids)")
    add_max_image_pixels_argument(r)
    r.set_defaults(_action=_predict)


def _add_data_overrides(p, splits) -> None:
    g = p.add_argument_group("explicit files (instead of, or on top of, --data)")
    for s in splits:
        g.add_argument(f"--{s}-images", help=f"{s} image folder")
        g.add_argument(f"--{s}-ann", help=f"{s} COCO instances JSON")


# detector constructor options among the builtin-data values
DETECTOR_OPTIONS = ("rpn_", "box_", "fpn", "anchor", "mask_head", "roi_")


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


def check_detector_options(img_size, scale_range, detector: dict, stride: int = 32) -> None:
    """The detector's own options, refused before any work, naming the flag and what it
    accepts."""
    from ._guard import check_img_size

    check_img_size(img_size, dict(stem_stride=stride // 8))
    if scale_range is not None:
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"--scale-range {low:g} {high:g}: give MIN MAX with 0 < MIN <= MAX "
                             f"(the recipe's is 0.1 2.0)")
    anchors = detector.get("anchor_sizes")
    if anchors is not None and min(anchors) < 1:
        raise ValueError(f"--anchor-sizes {' '.join(map(str, anchors))}: anchor sizes are box "
                         f"sides in pixels, each >= 1 (e.g. 32 64 128 256 512)")
    for flag in ("fpn_channels", "box_head_dim", "mask_head_dim"):
        value = detector.get(flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def _train(args) -> int:
    from ..detection.train import DetectionTask
    from ..recipes.presets import DETECTION_BUILTIN, DETECTION_RECIPE
    from ..transfer.engine import train

    builtin = DETECTION_BUILTIN if args.data == "builtin" else {}
    cfg = transfer_config(args, DETECTION_RECIPE, builtin)
    detector = {k: v for k, v in builtin.items() if k.startswith(DETECTOR_OPTIONS)}
    detector.update({k: getattr(args, k) for k in ("fpn_channels", "anchor_sizes",
                                                   "box_head_dim", "mask_head_dim")
                     if getattr(args, k) is not None})
    scale_range = None if args.no_jitter else pick(args, "scale_range", builtin,
                                                   DETECTION_RECIPE)
    check_detector_options(cfg.img_size, scale_range, detector, 8 * (cfg.stem_stride or 4))
    task = DetectionTask(_data(args), img_size=cfg.img_size, scale_range=scale_range,
                         masks=args.masks, detector_kwargs=detector)
    train(task, cfg)
    return 0


def _eval(args) -> int:
    from ..detection.data import CocoDetection, collate, eval_transforms
    from ..detection.evaluate import evaluate_detector
    from ..detection.model import detector_from_config
    from ..transfer.engine import read_model_file

    data = _data(args, ("val",))
    ckpt = read_model_file(args.checkpoint, "detection")

    def prepare():
        ds = CocoDetection(data.val_images, data.val_ann, eval_transforms(),
                           masks=ckpt["config"].get("masks", True))
        if len(ds.classes) != ckpt["config"]["num_classes"]:
            raise ValueError(f"{data.val_ann.name} has {len(ds.classes)} categories but the "
                             f"model was trained on {ckpt['config']['num_classes']}")
        model = detector_from_config(ckpt["config"])
        model.load_state_dict(ckpt["model"])
        return model, ds, collate

    return evaluate_run(
        args, prepare,
        lambda model, loader, ds, info: evaluate_detector(model, loader, ds, info.device,
                                                          args.amp, info,
                                                          progress=args.progress),
        lambda ds: f"{len(ds)} images of {data.val_ann.name}:",
        lambda metrics: [k for k in metrics if "AR" not in k])


def _predict(args) -> int:
    from ..detection.evaluate import to_coco_results
    from ..detection.visualize import draw, load_detector, predict

    records, image_id = [], None
    if args.json:
        check_new_json(args.json)
        image_id = _image_ids([image for image, _ in plan_pngs(args.images, args.output)],
                              args.ann)
    elif args.ann:
        raise ValueError("--ann names the ids of --json's records; give --json FILE too")
    category_ids = []

    def load(checkpoint):
        model, classes = load_detector(checkpoint)
        category_ids.extend(_category_ids(model, classes, args.ann))
        for image, _ in plan_pngs(args.images, args.output):  # before the first PNG
            _check_shape(image, model)
        return model, classes

    def run(model, pixels, classes, device):
        pred = predict(model, pixels, device)
        drawn, kept = draw(pixels, pred, classes, args.score_thresh)
        return drawn, dict(kept=kept, pred=pred)

    def record(path, found):
        if image_id is not None:
            records.extend(to_coco_results([found["pred"]], [image_id[path]], category_ids))

    code = predict_images(
        args, load, run,
        lambda found: f"{len(found['kept'])} objects" + "".join(
            f"\n  {n} {s:.2f}  box {[round(v) for v in b]}" for n, s, b in found["kept"]),
        record)
    if args.json:
        write_json(args.json, records)
        print(f"{len(records)} detections (COCO results) -> {args.json}")
    return code


def _image_ids(images, ann) -> dict:
    """The COCO ``image_id`` of each image: from ``ann``'s images by file name, else the
    number a COCO-style file name is (``000000397133.jpg`` -> 397133)."""
    images = [Path(p) for p in images]
    if ann:
        from ..detection.data import load_coco

        coco = load_coco(ann, masks=False)
        by_name = {Path(info["file_name"]).name: i for i, info in coco.imgs.items()}
        missing = [p.name for p in images if p.name not in by_name]
        if missing:
            raise ValueError(f"--ann {ann}: no image named {missing[0]!r} (of {len(missing)} "
                             f"not found); predict the images the file lists")
        return {p: by_name[p.name] for p in images}
    odd = [p.name for p in images if not p.stem.isdigit()]
    if odd:
        raise ValueError(f"--json needs COCO image ids: {odd[0]!r} is not a numeric file name "
                         f"(as COCO's 000000397133.jpg); give --ann INSTANCES.json")
    return {p: int(p.stem) for p in images}


def _category_ids(model, classes, ann) -> list[int]:
    """The COCO ``category_id`` of each class: ``ann``'s categories by name, else the ids of
    the model's training file."""
    if not ann:
        return list(model.category_ids)
    from ..detection.data import load_coco

    cats = load_coco(ann, masks=False).cats
    by_name = {c["name"]: i for i, c in cats.items()}
    missing = [n for n in classes if n not in by_name]
    if missing:
        raise ValueError(f"--ann {ann} has no category named {missing[0]!r}, one of the "
                         f"model's {len(classes)} classes")
    return [by_name[n] for n in classes]


def _check_shape(path, model) -> None:
    """Refuse (by its header, also size-checked) an image that the detector's resize would
    shrink to no pixel across: it scales the short side to ``min_size`` unless the long side
    would pass ``max_size``, so a 5000x1 strip ends 0 px high."""
    import math

    from ..data.image_limits import image_size

    w, h = image_size(path)
    t = model.transform
    scale = min(float(t.min_size[-1]) / min(w, h), float(t.max_size) / max(w, h))
    if math.floor(min(w, h) * scale) < 1:
        raise ValueError(f"image {path} is {w}x{h}: fitted into the detector's {t.max_size} px "
                         f"its short side becomes less than a pixel; crop it to a less "
                         f"elongated shape")
