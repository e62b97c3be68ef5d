"""What ``convnextv2 detect`` and ``convnextv2 segment`` share: the training options (the run
options of every training command, the backbone and the transfer optimisation options), how
they become a ``TransferConfig`` from the recipe tables of ``recipes/presets.py``, and the
``eval`` / ``predict`` plumbing."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import add_deprecated_alias, add_run_arguments, add_shared_optimisation_arguments

LENGTH_HELP = """Length: --epochs N, or --iters N optimizer steps (the ADE20K recipe's 160k
iterations): the schedule then runs over N steps and the last epoch stops part-way. The
model is evaluated every --eval-every epochs and at the end, one line each in metrics.jsonl
(steps.jsonl has every step's losses). --resume auto continues the newest checkpoint exactly;
options that would change the run (backbone, data, image size, batch, seed) are refused."""


# -- training options -------------------------------------------------------------------------
def add_train_parser(sub, what: str, model: str, data_help: str, epilog: str):
    """The ``train`` action's parser with its data and output options."""
    import argparse

    t = sub.add_parser("train", help=f"train a {what}", description=f"Train {model}.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--data", required=True, help=data_help)
    t.add_argument("--output", required=True,
                   help="run folder (created; one holding a run needs --resume or --overwrite)")
    return t


def add_backbone_options(p) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--model", help="backbone variant (convnextv2_atto ... _huge); default: the "
                                   "shape of --pretrained, else convnextv2_tiny")
    g.add_argument("--pretrained", metavar="CKPT",
                   help="backbone weights: an FCMAE encoder.safetensors from 'convnextv2 "
                        "pretrain', a fine-tuned classifier, official/timm/HF files or hub id")
    g.add_argument("--depths", type=int, nargs=4, help="custom backbone depths")
    g.add_argument("--dims", type=int, nargs=4, help="custom backbone widths")


def add_training_options(p, recipe: dict, gpus: int) -> None:
    """The optimisation and run options of ``detect train`` / ``segment train``; ``recipe``
    (its values named in the help) ran on ``gpus`` GPUs."""
    from ..transfer.engine import TransferConfig

    length = "iters" if recipe.get("iters") else "epochs"
    g = p.add_argument_group("optimisation (default: the paper's recipe)")
    g.add_argument("--epochs", type=int, help="training epochs" + (
        f" (recipe {recipe['epochs']})" if length == "epochs" else ", instead of --iters"))
    g.add_argument("--iters", type=int, help="training length in optimizer steps" + (
        f" (recipe {recipe['iters']})" if length == "iters" else ", instead of --epochs"))
    g.add_argument("--batch-size", type=int,
                   help=f"images per process (recipe {recipe['batch_size']} on each of {gpus} GPUs)")
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
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    add_shared_optimisation_arguments(
        g, warmup=f"recipe {recipe['warmup_steps']}, at most half the run",
        drop_path=f"recipe {recipe['drop_path']}")
    g.add_argument("--eval-every", type=int, metavar="EPOCHS",
                   help=f"epochs between evaluations (recipe {recipe['eval_every']}; the run's "
                        f"end is always evaluated)")
    g.add_argument("--eval-batch-size", type=int)
    add_deprecated_alias(g, "--eval-interval", None, note="evaluation runs every "
                         "--eval-every EPOCHS and at the end", type=int)
    add_deprecated_alias(g, "--log-interval", None, note="every step is logged", type=int)
    g = p.add_argument_group("run")
    add_run_arguments(g, TransferConfig(), fsdp=False, strict_data=False)
    g.add_argument("--threads", type=int, help="torch CPU threads")


def transfer_config(args, recipe: dict, builtin: dict | None):
    """The ``TransferConfig`` of a train command: each option as given, else the builtin-data
    value (``--data builtin``), else the recipe's."""
    import dataclasses

    from ..training.config import config_from_args
    from ..transfer.engine import TransferConfig

    defaults = {**recipe, **(builtin or {})}
    if args.epochs is not None or args.iters is not None:  # the length from one place only
        defaults.update(epochs=None, iters=None)
    if args.pretrained is not None:  # the checkpoint gives the shape
        defaults.update(depths=None, dims=None)
    values = {f.name: defaults[f.name] for f in dataclasses.fields(TransferConfig)
              if f.name in defaults and getattr(args, f.name, None) is None}
    values = {"depths": args.depths, "dims": args.dims, **values}  # resolved, for the checks
    if (args.depths or args.dims) and args.model:
        raise ValueError("give either --model or --depths/--dims, not both")
    if (values.get("depths") is None) != (values.get("dims") is None):
        raise ValueError("--depths and --dims go together (four numbers each)")
    if args.model is None and args.pretrained is None and not values.get("depths"):
        values["model"] = "convnextv2_tiny"
    return config_from_args(TransferConfig, args, **values)


def pick(args, name: str, *defaults):
    """The first set value of ``args.name`` and ``defaults`` (dicts looked up by ``name``, or
    plain values)."""
    value = getattr(args, name, None)
    for d in defaults:
        if value is not None:
            break
        value = d.get(name) if isinstance(d, dict) else d
    return value


def set_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def run(args) -> int:
    """Both commands' entry point: the thread count, then the chosen action (``cli.main`` has
    set the image size limit)."""
    set_threads(args)
    return args._action(args)


# -- eval -------------------------------------------------------------------------------------
def add_eval_options(e, batch_size: int) -> None:
    """The options ``detect eval`` and ``segment eval`` share (besides checkpoint and data)."""
    e.add_argument("--batch-size", type=int, default=batch_size)
    e.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    e.add_argument("--device")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--json", metavar="FILE", help="also write the metrics to this new file")
    e.add_argument("--threads", type=int)
    e.add_argument("--no-progress", dest="progress", action="store_false")


def evaluate_run(args, prepare, evaluate, header, keys) -> int:
    """The ``eval`` action both commands share, sharded over torchrun's processes.
    ``prepare() -> (model, dataset, collate)``, ``evaluate(model, loader, dataset, info) ->
    metrics``; rank 0 prints ``header(dataset)`` and the metrics named by ``keys(metrics)``."""
    from ..training.dist_eval import sharded_loader
    from ..training.distributed import cleanup_distributed, init_distributed

    check_new_json(args.json)  # before the evaluation, not after it
    info = init_distributed(args.device)
    try:
        model, dataset, collate = prepare()
        model.to(info.device)
        loader = sharded_loader(dataset, info, batch_size=args.batch_size, collate_fn=collate,
                                num_workers=args.workers)
        metrics = evaluate(model, loader, dataset, info)
    finally:
        cleanup_distributed()
    if info.is_main:
        print(header(dataset))
        print_metrics(metrics, keys(metrics))
        write_json(args.json, metrics)
    return 0


def print_metrics(metrics: dict, keys) -> None:
    width = max(len(k) for k in keys)
    for k in keys:
        if k in metrics:
            print(f"  {k:<{width}}  {metrics[k]:6.2f}")


def check_new_json(path) -> Path | None:
    """``--json FILE`` checked before any work: a new file in a folder that can be written."""
    if not path:
        return None
    from ._guard import writable_file

    path = writable_file(path, "--json", "results.json")
    if path.exists():
        raise ValueError(f"--json {path} already exists; give a new file name")
    return path


def write_json(path, payload) -> None:
    """``--json FILE``: ``payload`` as JSON, never over an existing file, written atomically."""
    if not path:
        return
    from ..checkpoint.atomic import atomic_write_bytes

    path = check_new_json(path)
    atomic_write_bytes(json.dumps(payload, indent=2).encode(), path)


# -- predict ----------------------------------------------------------------------------------
def add_predict_options(r) -> None:
    """The options ``detect predict`` and ``segment predict`` share."""
    r.add_argument("--checkpoint", required=True, help="a run's model.pt (or the run folder)")
    r.add_argument("images", nargs="+", help="image files, or folders (their images, in name "
                                             "order)")
    r.add_argument("--output", required=True, help="folder for the PNGs")
    r.add_argument("--device")
    r.add_argument("--threads", type=int)


def plan_pngs(paths, folder) -> list[tuple[Path, Path]]:
    """``(image, PNG)`` pairs for the images and folders of ``paths``, every target checked
    before any work: two images with one name stem, or a PNG already there, are refused."""
    from ._guard import expand_images

    images = expand_images(paths)
    folder = Path(folder)
    by_target: dict[Path, Path] = {}
    for image in images:
        target = folder / f"{Path(image).stem}.png"
        if target in by_target:
            raise ValueError(f"{by_target[target]} and {image} would both be written to "
                             f"{target}; predict them into separate --output folders")
        if target.exists():
            raise ValueError(f"{target} already exists; predictions never overwrite files, "
                             f"pick another --output")
        by_target[target] = Path(image)
    return [(image, target) for target, image in by_target.items()]


def predict_images(args, load, draw, describe, record=None) -> int:
    """The ``predict`` loop both transfer commands share: ``load(checkpoint) -> (model,
    classes)``, ``draw(model, pixels, classes, device) -> (picture, found)``, and
    ``describe(found) -> str`` for the line printed per image; ``record(image, found)``, if
    given, sees each image's result too. Every target (each PNG, name clashes, the output
    folder) is checked before the model is loaded, and each PNG is written atomically."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from ..checkpoint.atomic import atomic_write
    from ..data.image_limits import open_image
    from ..training.distributed import pick_device
    from ._guard import writable_folder

    plan = plan_pngs(args.images, args.output)
    writable_folder(args.output)
    model, classes = load(args.checkpoint)
    device = pick_device(args.device)
    model.to(device)
    for path, target in plan:
        pixels = F.pil_to_tensor(open_image(path, "RGB"))  # one-line errors naming the file
        drawn, found = draw(model, pixels, classes, device)
        picture = Image.fromarray(drawn.permute(1, 2, 0).numpy())
        atomic_write(target, lambda f: picture.save(f, format="PNG"))
        if record is not None:
            record(path, found)
        print(f"{path} -> {target}: {describe(found)}")
    return 0
