"""``convnextv2 segment train|eval|predict``: UPerNet on a ConvNeXt V2 backbone, on
ADE20K-layout data."""
from __future__ import annotations

from pathlib import Path

from ._common import add_max_image_pixels_argument
from ._transfer import (LENGTH_HELP, add_backbone_options, add_eval_options,
                        add_predict_options, add_train_parser, add_training_options,
                        evaluate_run, pick, predict_images, transfer_config)
from ._transfer import run  # noqa: F401  (the command's entry point, shared with detect)

HELP = "Semantic segmentation (UPerNet) with a ConvNeXt V2 backbone."
EPILOG = """examples:
  convnextv2 segment train --data builtin --output runs/seg --depths 1 1 2 1 --dims 24 48 96 192
  convnextv2 segment train --data /data/ADEChallengeData2016 --output runs/upernet_tiny \\
      --model convnextv2_tiny --pretrained convnextv2_tiny_1k_224_ema.pt --amp bf16
  torchrun --nproc_per_node 8 -m convnextv2 segment train --data /data/ADEChallengeData2016 \\
      --output runs/u --model convnextv2_base --pretrained base.pt --batch-size 2 --amp bf16
  convnextv2 segment eval --checkpoint runs/seg/model.pt --data /data/ADEChallengeData2016 --tta
  convnextv2 segment eval --checkpoint runs/seg/model.pt --data /data/ADE --mode whole
  convnextv2 segment predict --checkpoint runs/seg/model.pt photo.jpg --output preds/
  convnextv2 segment predict --checkpoint runs/seg/model.pt val/ --output viz/ --label-png sub/

--data ROOT is ADE20K's layout: ROOT/images/{training,validation}/*.jpg and
ROOT/annotations/{training,validation}/*.png, mask value 0 = ignore and 1..K the classes
(--no-reduce-zero-label for masks whose 0 is a class). Class names come from ROOT/classes.txt
or objectInfo150.txt; otherwise pass --num-classes. 'builtin': synthetic Fashion-MNIST scenes.
Defaults are the ConvNeXt V2 ADE20K recipe (UPerNet, 160k iterations of 16 512x512 crops,
AdamW lr 1e-4, wd 0.05, poly schedule, 1500 warmup, stage-wise layer decay 0.9, drop path
0.4, evaluated every 13 epochs: about mmseg's every 16k iterations); see docs/transfer.md.
Tests as the paper's configs: short side = crop (512), sliding 512x512 windows at stride 341;
the model keeps these settings, and eval/predict use them (--mode, --window, --stride,
--eval-size override). 'builtin' data is tested whole, at native size.

""" + LENGTH_HELP


def add_arguments(p):
    from ..recipes.presets import SEGMENTATION_RECIPE as RECIPE

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = add_train_parser(sub, "segmenter", "UPerNet", "ADE20K-layout root, or 'builtin'",
                         EPILOG)
    _add_data_options(t)
    add_backbone_options(t)
    g = t.add_argument_group("segmenter")
    g.add_argument("--crop", type=int, help=f"training crop (recipe {RECIPE['crop']})")
    g.add_argument("--scale", type=int, nargs=2, metavar=("SHORT", "LONG"),
                   help="rescale target before jitter (default: crop, 4 x crop)")
    g.add_argument("--ratio-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="random rescale factors (recipe 0.5 2.0)")
    g.add_argument("--channels", type=int, help="UPerNet head width (512)")
    g.add_argument("--aux-channels", type=int, help="auxiliary FCN head width (256)")
    g.add_argument("--no-aux", dest="aux", action="store_false", help="no auxiliary head")
    g.add_argument("--aux-weight", type=float, default=RECIPE["aux_weight"])
    g.add_argument("--head-norm", choices=("bn", "gn"), default="bn",
                   help="BatchNorm (SyncBN under torchrun) or GroupNorm in the heads")
    add_training_options(t, RECIPE, gpus=1)
    t.set_defaults(_action=_train)

    e = sub.add_parser("eval", help="mIoU and pixel accuracy of a trained segmenter",
                       description="mIoU and pixel accuracy of a trained segmenter.")
    e.add_argument("--checkpoint", required=True, help="a run's model.pt (or the run folder)")
    e.add_argument("--data", required=True, help="ADE20K-layout root (its validation split)")
    _add_data_options(e)
    e.add_argument("--tta", action="store_true",
                   help="multi-scale (0.75, 1.0, 1.25) + flip test, as the paper's numbers")
    _add_test_options(e)
    add_eval_options(e, batch_size=1)
    e.set_defaults(_action=_eval)

    r = sub.add_parser("predict", help="colour maps of images (PNG)",
                       description="Colour each pixel by its predicted class, over the image.")
    add_predict_options(r)
    r.add_argument("--alpha", type=float, default=0.55, help="opacity of the colour map")
    r.add_argument("--label-png", metavar="DIR",
                   help="also write each image's raw class-index PNG here (ADE20K submission "
                        "format: uint8, class k stored as k + 1 as in the annotations, 0 = "
                        "unlabelled and never predicted; the index itself for a model "
                        "trained with --no-reduce-zero-label)")
    r.add_argument("--eval-size", type=int,
                   help="shorter edge the image is rescaled to (default: the model's)")
    _add_test_options(r)
    add_max_image_pixels_argument(r)
    r.set_defaults(_action=_predict)


def _add_data_options(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--num-classes", type=int, help="class count when the data folder has no "
                                                   "classes.txt / objectInfo150.txt")
    g.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false",
                   help="mask value 0 is a class (default: 0 = ignore, as in ADE20K)")
    g.add_argument("--eval-size", type=int, help="shorter edge of test images (default: the "
                                                 "crop size in training, as they are in eval)")
    add_max_image_pixels_argument(g)


NETWORK_STRIDE = 32  # a ConvNeXt's total stride (stem 4, three downsamplings of 2)


def _add_test_options(p) -> None:
    g = p.add_argument_group("inference (default: as saved with the model)")
    g.add_argument("--mode", choices=("slide", "whole"),
                   help="sliding windows (the paper's ADE20K test) or the whole image at once")
    g.add_argument("--window", type=int, help="sliding window side in px (default: the "
                                              "training crop)")
    g.add_argument("--stride", type=int, help="sliding window stride in px (default: 2/3 of "
                                              "the window, 341 for 512)")


def _check_sizes(args, stride_px: int) -> None:
    """One-line refusals of sizes the network cannot take (below its total stride) and of
    rescale ranges that are empty or inverted (the transform would draw from them silently)."""
    from ._guard import at_least

    for flag in ("crop", "eval_size", "window"):
        value = getattr(args, flag, None)
        if value is not None and value < stride_px:
            raise ValueError(f"--{flag.replace('_', '-')} {value} is smaller than the network's "
                             f"total stride {stride_px} px; use at least {stride_px}")
    for flag in ("channels", "aux_channels", "num_classes", "stride"):
        at_least(f"--{flag.replace('_', '-')}", getattr(args, flag, None), 1)
    scale = getattr(args, "scale", None)
    if scale is not None and not 1 <= scale[0] <= scale[1]:
        raise ValueError(f"--scale {scale[0]} {scale[1]}: give SHORT LONG in px with "
                         f"1 <= SHORT <= LONG (ADE20K's is 512 2048)")
    ratios = getattr(args, "ratio_range", None)
    if ratios is not None and not 0 < ratios[0] <= ratios[1]:
        raise ValueError(f"--ratio-range {ratios[0]:g} {ratios[1]:g}: give MIN MAX with "
                         f"0 < MIN <= MAX (the recipe's is 0.5 2.0)")
    window = getattr(args, "window", None)
    if getattr(args, "stride", None) and window and args.stride > window:
        raise ValueError(f"--stride {args.stride} is larger than --window {window}: the "
                         f"windows would leave pixels unseen")


def _root(args) -> Path:
    if args.data == "builtin":
        from ..transfer.synthetic import builtin_scenes
        return builtin_scenes()["segmentation"]
    return Path(args.data)


def _train(args) -> int:
    from ..recipes.presets import SEGMENTATION_BUILTIN, SEGMENTATION_RECIPE
    from ..segmentation.train import SegmentationTask
    from ..transfer.engine import train

    builtin = SEGMENTATION_BUILTIN if args.data == "builtin" else None
    d = [builtin or {}, SEGMENTATION_RECIPE]
    _check_sizes(args, NETWORK_STRIDE)
    cfg = transfer_config(args, SEGMENTATION_RECIPE, builtin)
    head = dict(channels=pick(args, "channels", builtin or {}, 512),
                aux_channels=pick(args, "aux_channels", builtin or {}, 256), aux=args.aux,
                norm=args.head_norm)
    crop = pick(args, "crop", *d)
    task = SegmentationTask(_root(args), crop=crop, scale=pick(args, "scale", builtin or {}),
                            ratio_range=pick(args, "ratio_range", *d),
                            num_classes=args.num_classes,
                            reduce_zero_label=args.reduce_zero_label,
                            eval_size=args.eval_size or (None if builtin else crop),
                            aux_weight=args.aux_weight, head_kwargs=head,
                            eval_mode="whole" if builtin else "slide")
    train(task, cfg)
    return 0


def _load(checkpoint):
    from ..segmentation.visualize import load_segmenter
    from ..transfer.engine import read_model_file

    model, classes = load_segmenter(checkpoint)
    return model, classes, read_model_file(checkpoint, "segmentation")


def _eval(args) -> int:
    from ..segmentation.data import SegmentationFolder, collate_eval, eval_transforms
    from ..segmentation.data import read_class_names
    from ..segmentation.evaluate import evaluate_segmenter
    from ..segmentation.inference import test_settings
    from ..segmentation.visualize import network_stride

    model, classes, ckpt = _load(args.checkpoint)
    _check_sizes(args, network_stride(model))
    trained = ckpt["config"]["num_classes"]
    t = test_settings(model.config, args.mode, args.eval_size, args.window, args.stride)

    def prepare():
        root = _root(args)  # the data's own class count when it names its classes
        named = args.num_classes or (None if read_class_names(root) else trained)
        ds = SegmentationFolder(root, "val", eval_transforms(t["size"]), named,
                                args.reduce_zero_label)
        if ds.num_classes != trained:
            raise ValueError(f"the data {root} has {ds.num_classes} classes but the model "
                             f"{args.checkpoint} was trained on {trained}; evaluate it on data "
                             f"with the same classes")
        return model, ds, collate_eval

    scales = (0.75, 1.0, 1.25) if args.tta else (1.0,)
    how = (f"{t['mode']} {t['window']}px/{t['stride']}" if t["mode"] == "slide" else "whole") \
        + (f", short side {t['size']}" if t["size"] else ", native size")
    return evaluate_run(
        args, prepare,
        lambda model, loader, ds, info: evaluate_segmenter(
            model, loader, ds.num_classes, info.device, args.amp, info, progress=args.progress,
            scales=scales, flip=args.tta, mode=t["mode"], window=t["window"],
            stride=t["stride"]),
        lambda ds: (f"{len(ds)} validation images, {ds.num_classes} classes ({how}"
                    f"{', multi-scale + flip' if args.tta else ''}):"),
        lambda metrics: ["mIoU", "aAcc", "mAcc"])


def _predict(args) -> int:
    from PIL import Image

    from ..checkpoint.atomic import atomic_write
    from ..data.image_limits import image_size
    from ..segmentation.inference import test_settings
    from ..segmentation.visualize import (check_input_size, label_png, load_segmenter,
                                          network_stride, predict_and_draw)
    from ._guard import writable_folder
    from ._transfer import plan_pngs

    model, classes = load_segmenter(args.checkpoint)
    _check_sizes(args, network_stride(model))
    t = test_settings(model.config, args.mode, args.eval_size, args.window, args.stride)
    plan = plan_pngs(args.images, args.output)
    for path, _ in plan:  # every image checked before any is predicted or written
        width, height = image_size(path)
        check_input_size(model, height, width, t["size"], path)
    labels = None
    if args.label_png:
        labels = dict(plan_pngs(args.images, args.label_png))
        writable_folder(args.label_png, "--label-png")

    def draw(model, pixels, classes, device):
        drawn, share, pred = predict_and_draw(model, pixels, classes, args.alpha, device,
                                              mode=t["mode"], size=t["size"],
                                              window=t["window"], stride=t["stride"])
        return drawn, dict(share=share, pred=pred)

    def record(path, found):
        if labels is not None:
            picture = Image.fromarray(label_png(found["pred"], t["reduce_zero_label"]))
            atomic_write(labels[path], lambda f: picture.save(f, format="PNG"))

    return predict_images(
        args, lambda checkpoint: (model, classes), draw,
        lambda found: ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                sorted(found["share"].items(), key=lambda kv: -kv[1])),
        record)
