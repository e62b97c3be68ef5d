"""``convnextv2 detect train|eval|predict``: Mask R-CNN / Faster R-CNN on a ConvNeXt V2
backbone, on COCO-format data."""
from __future__ import annotations

from pathlib import Path

from ._transfer import (LENGTH_HELP, add_backbone_options, add_eval_options,
                        add_predict_options, add_train_parser, add_training_options,
                        evaluate_run, pick, predict_images, transfer_config)
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
    add_training_options(t, RECIPE, gpus=16)
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
    from ..detection.visualize import load_detector, predict_and_draw

    return predict_images(
        args, load_detector,
        lambda model, pixels, classes, device: predict_and_draw(model, pixels, classes,
                                                                args.score_thresh, device),
        lambda found: f"{len(found)} objects" + "".join(
            f"\n  {n} {s:.2f}  box {[round(v) for v in b]}" for n, s, b in found))
