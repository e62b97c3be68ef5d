"""Sharing a trained model on the Hugging Face Hub: ``push_to_hub`` and ``convnextv2 push``.

The folder uploaded is the one a timm or transformers user expects to find:

- ``--layout timm``: ``model.safetensors`` in timm's key names and ``config.json`` with the
  architecture, its arguments (``model_args``), the label names and ``pretrained_cfg``
  (input size, mean, std, crop_pct, interpolation...), so ``timm.create_model("hf-hub:ID",
  pretrained=True)`` builds and loads it;
- ``--layout hf``: ``model.safetensors`` in transformers' names, its ``config.json``
  (``ConvNextV2Config``) and ``preprocessor_config.json`` (``ConvNextImageProcessor``);

plus a ``README.md`` model card (``tools.model_card``) and, for an FCMAE encoder, the
run's reconstruction grid. The weights are written by the checkpoint module's layout
converters; nothing here maps keys. ``dry_run=DIR`` writes the same folder to ``DIR``
(atomically: the complete folder appears, or nothing) and touches no network.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.atomic import _umask, atomic_write_bytes
from ..checkpoint.layouts import timm_uses_conv_mlp
from ..checkpoint.loading import load_model
from ..checkpoint.saving import save_checkpoint
from ..data.transforms import default_crop_pct, is_small_image, mean_std
from ..models.model import ConvNeXtV2
from ..models.variants import resolve_name, variant_of
from ..training.replay import CONFIG_FILE
from .model_card import (RECIPE_KEYS, CardFacts, build_model_card, classifier_metrics,
                         encoder_metrics)
from .stats import count_macs, count_params

LAYOUTS = ("timm", "hf")
DEFAULT_LICENSE = "cc-by-nc-4.0"  # the official ConvNeXt V2 weights' licence
RECONSTRUCTION = "reconstruction.png"
# what a push folder holds: --overwrite replaces a folder holding nothing else
PUSH_FILES = ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
              RECONSTRUCTION, CONFIG_FILE)
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


class PushError(OSError):
    """The upload failed (network, authentication, permissions): nothing was pushed."""


@dataclass
class PushSource:
    """What is pushed and what is known about it: the weight file, the run folder it came from
    (None for a lone file), and that run's records."""
    weights: Path
    run: Path | None = None
    command: str | None = None       # the training command: "finetune" or "pretrain"
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


# -- checks (before any work) ----------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"repo id {repo_id!r} is not a Hub model id: use 'name' or "
                         f"'namespace/name' with letters, digits, '-', '_' and '.' (not first "
                         f"or last), at most 96 characters") from None
    return repo_id


def check_license(license: str) -> str:
    if not _LICENSE.match(str(license)):
        raise ValueError(f"--license {license!r} is not a Hub licence identifier; use e.g. "
                         f"apache-2.0, mit, cc-by-4.0, cc-by-nc-4.0 or other")
    return license


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: use timm or hf")
    return layout


def check_destination(folder: Path, overwrite: bool) -> None:
    """A dry-run folder may be new or empty; with ``overwrite`` also an earlier push folder,
    never a folder holding anything else (a run, data)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--dry-run {folder} is a file; give a folder to write the upload to")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    found = sorted(p.name for p in folder.iterdir())
    if not overwrite:
        raise ValueError(f"--dry-run {folder} is not empty ({', '.join(found[:4])}); pick a new "
                         f"folder, or pass --overwrite to replace an earlier push folder")
    foreign = [n for n in found if n not in PUSH_FILES]
    if foreign:
        raise ValueError(f"--dry-run {folder} holds files a push folder does not "
                         f"({', '.join(foreign[:4])}); --overwrite only replaces an earlier "
                         f"push folder: pick a new folder")


# -- what is pushed --------------------------------------------------------------------------
def resolve_source(path: str | os.PathLike) -> PushSource:
    """The weights of a run folder (a fine-tuning run's best weights, a pretraining run's
    encoder) or a weight file, with the records of the run it belongs to."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint (give the --output "
                                f"folder of `convnextv2 finetune` or `pretrain`, or a weight "
                                f"file such as best.safetensors)")
    run = path if path.is_dir() else path.parent
    summary, config = _read_json(run / "summary.json"), _read_json(run / "config.json")
    if path.is_dir():
        weights = _run_weights(path, summary)
    elif path.name == "fcmae.safetensors" and (run / "encoder.safetensors").is_file():
        weights = run / "encoder.safetensors"  # the encoder is what a user can load
    else:
        weights = path
    if not (summary or (run / CONFIG_FILE).is_file()):  # what every training run leaves
        return PushSource(weights)  # a lone file: no run records, no metrics
    pretrain_run = (run / "fcmae.safetensors").is_file() or "last_epoch_loss" in summary
    return PushSource(weights, run, "pretrain" if pretrain_run else "finetune", summary, config)


def _run_weights(run: Path, summary: dict) -> Path:
    if (run / "model.pt").is_file():
        raise ValueError(f"{run} is a detection or segmentation run; push shares classifiers "
                         f"and FCMAE encoders (a finetune or pretrain run)")
    best = Path(summary["best"]).name if summary.get("best") else "best.safetensors"
    for name in (best, "best.safetensors", "encoder.safetensors"):
        if (run / name).is_file():
            return run / name
    raise FileNotFoundError(f"{run} holds no weights to push (best.safetensors of a finetune "
                            f"run or encoder.safetensors of a pretrain run); is the run "
                            f"finished?")


def _read_json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _load(source: PushSource) -> ConvNeXtV2:
    from ..checkpoint.io import _unpickler_reason  # torch's cause, not its unsafe advice
    try:
        model = load_model(source.weights).eval()
    except (RuntimeError, EOFError, KeyError, IndexError) as e:
        raise ValueError(f"cannot read {source.weights}: not a readable checkpoint "
                         f"({_unpickler_reason(str(e))[:200]})") from None
    if not model.config.get("use_grn", True) or model.config.get("layer_scale_init_value"):
        raise ValueError(f"{source.weights} holds V1-style blocks (an ablation model); timm's "
                         f"and transformers' ConvNeXt V2 classes hold V2 blocks only")
    return model


# -- the folder ------------------------------------------------------------------------------
def preprocessing(source: PushSource, model: ConvNeXtV2) -> dict:
    """Input size, mean, std, crop ratio and interpolation the model was trained and scored
    with (the run's records, else the recipe's values at its size)."""
    meta = getattr(model, "checkpoint_metadata", {})
    hyper = source.config.get("hyperparameters", {})
    img_size = int(meta.get("img_size") or hyper.get("img_size")
                   or source.summary.get("img_size") or 224)
    crop_pct = hyper.get("crop_pct") or default_crop_pct(img_size)
    mean, std = mean_std(int(model.config.get("in_chans", 3)))
    return dict(img_size=img_size, mean=list(mean), std=list(std), crop_pct=float(crop_pct),
                interpolation="bicubic",
                small_image=is_small_image(img_size) and not hyper.get("crop_pct"))


def timm_config(model: ConvNeXtV2, architecture: str, pre: dict, license: str,
                classes: list) -> dict:
    """timm's ``config.json``: the architecture, the arguments that rebuild this shape, and
    the ``pretrained_cfg`` timm's data pipeline reads."""
    c, size = model.config, pre["img_size"]
    stride = int(c.get("stem_stride", 4)) * 8
    cfg = dict(architecture=architecture, num_classes=int(c["num_classes"]),
               num_features=int(c["dims"][-1]), global_pool="avg",
               model_args=dict(depths=list(c["depths"]), dims=list(c["dims"]),
                               in_chans=int(c.get("in_chans", 3)),
                               patch_size=int(c.get("stem_stride", 4)),
                               conv_mlp=timm_uses_conv_mlp(c["dims"]), use_grn=True,
                               ls_init_value=None))
    if classes:
        cfg["label_names"] = list(classes)
    cfg["pretrained_cfg"] = dict(
        custom_load=False, input_size=[int(c.get("in_chans", 3)), size, size],
        fixed_input_size=False, interpolation=pre["interpolation"], crop_pct=pre["crop_pct"],
        crop_mode="center", mean=pre["mean"], std=pre["std"], num_classes=int(c["num_classes"]),
        pool_size=[max(1, size // stride)] * 2, first_conv="stem.0", classifier="head.fc",
        license=license)
    return cfg


def preprocessor_config(pre: dict) -> dict:
    """transformers' ``preprocessor_config.json`` for ``ConvNextImageProcessor`` (below 384
    px it resizes the short side to size / crop_pct and centre-crops, as our evaluation)."""
    return dict(image_processor_type="ConvNextImageProcessor", do_resize=True,
                size=dict(shortest_edge=pre["img_size"]), crop_pct=pre["crop_pct"],
                resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=pre["mean"], image_std=pre["std"])


def write_push_folder(source: PushSource, folder: Path, *, repo_id: str, layout: str,
                      license: str) -> Path:
    """Write the upload into ``folder`` (which must be empty): weights, configs, card."""
    model = _load(source)
    kind = "classifier" if model.config["num_classes"] else "encoder"
    classes = list(getattr(model, "class_names", None) or source.summary.get("classes") or [])
    classes = classes if len(classes) == model.config["num_classes"] else []
    pre = preprocessing(source, model)
    variant = variant_of(model.config)
    architecture = variant or _named_model(source) or "convnextv2_atto"
    names = {"class_names": json.dumps(classes)} if classes else {}
    if layout == "timm":
        save_checkpoint(model, folder / "model.safetensors", layout="timm")
        _write_json(folder / "config.json", timm_config(model, architecture, pre, license,
                                                        classes))
    else:
        save_checkpoint(model, folder, layout="hf", metadata=names)
        hf = json.loads((folder / "config.json").read_text())
        _write_json(folder / "config.json", dict(hf, image_size=pre["img_size"]))
        _write_json(folder / "preprocessor_config.json", preprocessor_config(pre))
    copied = _copy_run_files(source, kind, folder)
    facts = _card_facts(source, model, kind, pre, classes)
    facts.update(repo_id=repo_id, layout=layout, license=license,
                 variant=variant or f"custom shape based on {architecture}",
                 reconstruction=RECONSTRUCTION if RECONSTRUCTION in copied else None,
                 replay=CONFIG_FILE if CONFIG_FILE in copied else None)
    atomic_write_bytes(build_model_card(CardFacts(**facts)).encode(), folder / "README.md")
    return folder


def _copy_run_files(source: PushSource, kind: str, folder: Path) -> list[str]:
    """The run's files that travel with the weights: ``config.yaml`` (what repeats the run)
    and, for an FCMAE encoder, the reconstruction grid. Returns the names copied."""
    if source.run is None:
        return []
    names = [CONFIG_FILE, RECONSTRUCTION] if kind == "encoder" else [CONFIG_FILE]
    copied = [n for n in names if (source.run / n).is_file()]
    for name in copied:
        shutil.copyfile(source.run / name, folder / name)
    return copied


def _run_args(source: PushSource) -> dict:
    """The options the run recorded (finetune: config.json; pretrain: summary.json too)."""
    return source.config.get("config") or source.summary.get("config") or {}


def _named_model(source: PushSource) -> str | None:
    args = _run_args(source)
    try:
        return resolve_name(args["model"]) if args.get("model") else None
    except ValueError:
        return None


def _card_facts(source: PushSource, model: ConvNeXtV2, kind: str, pre: dict,
                classes: list) -> dict:
    """What the run tells the card: data, command, recipe, metrics, sizes."""
    args = _run_args(source)
    values = {**args, **source.config.get("hyperparameters", {}),
              **{k: source.summary[k] for k in ("effective_batch", "lr") if k in source.summary}}
    recipe = {k: values[k] for k in RECIPE_KEYS if values.get(k) is not None}
    with torch.device("meta"):
        shape = ConvNeXtV2(**model.config)
    metrics = (classifier_metrics if kind == "classifier" else encoder_metrics)(source.summary)
    return dict(
        kind=kind, model_config=dict(model.config), img_size=pre["img_size"], preprocessing=pre,
        params=count_params(model), macs=count_macs(shape, pre["img_size"]), classes=classes,
        data=source.summary.get("data") or args.get("data"),
        command=source.command,
        recipe=recipe, metrics=metrics, source=source.weights.name)


def _write_json(path: Path, record: dict) -> None:
    atomic_write_bytes(json.dumps(record, indent=2).encode(), path)


def write_dry_run(source: PushSource, folder: Path, overwrite: bool, **options) -> Path:
    """The push folder at ``folder``, complete or not at all: built in a hidden sibling, then
    moved into place (an earlier push folder replaced under ``overwrite``)."""
    check_destination(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        write_push_folder(source, build, **options)
        os.chmod(build, 0o777 & ~_umask())
        if folder.is_dir() and any(folder.iterdir()):
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(build, folder)
            shutil.rmtree(old)
        else:
            if folder.is_dir():
                folder.rmdir()
            os.replace(build, folder)
    finally:
        if build.exists():
            shutil.rmtree(build)
    return folder


# -- the upload ------------------------------------------------------------------------------
def push_to_hub(source: str | os.PathLike, repo_id: str, *, layout: str = "timm",
                private: bool = False, license: str = DEFAULT_LICENSE,
                dry_run: str | os.PathLike | None = None, overwrite: bool = False,
                token: str | None = None, commit_message: str | None = None) -> str:
    """Share a run (or weight file) as the Hub repository ``repo_id``.

    Args:
        source: a ``finetune`` run folder (its best weights), a ``pretrain`` run folder (its
            encoder) or a weight file; the run's ``summary.json`` feeds the model card.
        layout: "timm" (timm's names and ``pretrained_cfg``) or "hf" (transformers').
        private: create the repository private.
        license: the card's licence identifier (default that of the official weights).
        dry_run: write the folder that would be uploaded there instead, without network.
        overwrite: let ``dry_run`` replace an earlier push folder.

    Returns the URL of the Hub commit, or the dry-run folder.
    """
    check_repo_id(repo_id)
    check_layout(layout)
    check_license(license)
    if dry_run is not None:
        check_destination(Path(dry_run).expanduser(), overwrite)
    found = resolve_source(source)
    options = dict(repo_id=repo_id, layout=layout, license=license)
    if dry_run is not None:
        return str(write_dry_run(found, Path(dry_run).expanduser(), overwrite, **options))
    with tempfile.TemporaryDirectory(prefix="convnextv2-push-") as tmp:
        write_push_folder(found, Path(tmp), **options)
        return _upload(Path(tmp), repo_id, private, token,
                       commit_message or f"Upload {found.weights.name} with convnextv2 push")


def _upload(folder: Path, repo_id: str, private: bool, token, message: str) -> str:
    """``create_repo`` (kept if it exists) and one ``upload_folder`` commit."""
    from huggingface_hub import HfApi, errors

    # transport failures: httpx's HTTPError in huggingface_hub >= 1.0, OSError (requests) before
    failures = (getattr(errors, "HTTPError", OSError), errors.HfHubHTTPError,
                errors.LocalTokenNotFoundError, OSError)

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message=message)
    except failures as e:
        raise PushError(f"uploading to {repo_id} failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'}); nothing was "
                        f"pushed. Log in with `hf auth login` or set HF_TOKEN, check the "
                        f"network, or write the folder with --dry-run DIR") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
