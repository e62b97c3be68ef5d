"""The README.md model card that ``convnextv2 push`` puts beside the weights.

A card is built from what the run left behind, not from what a user types: the task and data,
the recipe and the command that repeats the run (its ``config.yaml``, uploaded beside the
weights, given back to the training command), the metrics of its ``summary.json``, the
parameter and multiply-accumulate counts, and the licence in the YAML front matter the Hub
reads. An FCMAE encoder's card shows its reconstruction grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

# recipe values shown on the card, in this order, when the run recorded them
RECIPE_KEYS = ("recipe", "epochs", "batch_size", "accum_steps", "effective_batch", "lr", "blr",
               "min_lr", "weight_decay", "layer_decay", "drop_path", "warmup_epochs",
               "warmup_steps", "smoothing", "mixup", "cutmix", "model_ema", "model_ema_decay",
               "mask_ratio", "norm_pix_loss", "decoder_dim", "decoder_depth", "init",
               "finetune", "freeze_encoder", "amp", "seed")


@dataclass
class CardFacts:
    """Everything a card states; ``kind`` is "classifier" (a fine-tuning run) or "encoder"
    (an FCMAE pretraining run)."""
    repo_id: str
    layout: str                      # "timm" or "hf": which library the folder is for
    license: str
    kind: str
    variant: str                     # "convnextv2_tiny", or a description of a custom shape
    model_config: dict
    img_size: int
    preprocessing: dict              # mean, std, crop_pct, interpolation
    params: int
    macs: int
    classes: list = field(default_factory=list)
    data: str | None = None
    command: str | None = None                    # "finetune" or "pretrain", when known
    replay: str | None = None                     # the run's config.yaml, uploaded too
    recipe: dict = field(default_factory=dict)
    metrics: list = field(default_factory=list)   # (name, value as text)
    reconstruction: str | None = None             # file name of the grid in the folder
    source: str = ""                              # the weight file pushed


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def classifier_metrics(summary: Mapping) -> list[tuple[str, str]]:
    """The validation scores of a fine-tuning run's ``summary.json``."""
    rows = []
    if summary.get("best_top1", -1) >= 0:
        source = "EMA" if summary.get("best_source") == "ema" else "model"
        rows.append(("best validation top-1 (%), the weights pushed",
                     f"{summary['best_top1']:.2f} ({source} weights, epoch "
                     f"{summary.get('best_epoch')})"))
    for key, name in (("best_model_top1", "best top-1 of the model weights (%)"),
                      ("best_ema_top1", "best top-1 of the EMA weights (%)")):
        if isinstance(summary.get(key), (int, float)) and summary[key] >= 0:
            rows.append((name, f"{summary[key]:.2f}"))
    final = summary.get("final") or {}
    for key, name in (("val_top1", "last epoch: validation top-1 (%)"),
                      ("val_top5", "last epoch: validation top-5 (%)"),
                      ("val_loss", "last epoch: validation loss"),
                      ("train_loss", "last epoch: training loss")):
        if key in final:
            rows.append((name, f"{final[key]:.4f}" if "loss" in key else f"{final[key]:.2f}"))
    return rows + _progress(summary)


def encoder_metrics(summary: Mapping) -> list[tuple[str, str]]:
    """The reconstruction losses of an FCMAE run's ``summary.json``."""
    rows = [(name, f"{summary[key]:.4f}") for key, name in (
        ("first_epoch_loss", "reconstruction loss, mean of the first epoch"),
        ("last_epoch_loss", "reconstruction loss, mean of the last epoch"),
        ("last_loss", "reconstruction loss, last step")) if key in summary]
    return rows + _progress(summary)


def _progress(summary: Mapping) -> list[tuple[str, str]]:
    return [(name, _number(summary[key])) for key, name in (
        ("epochs", "epochs"), ("global_step", "optimizer steps"),
        ("train_time_s", "training time (s)")) if key in summary]


def build_model_card(f: CardFacts) -> str:
    """The card's text: YAML front matter, then the sections in the order a reader asks."""
    library = "timm" if f.layout == "timm" else "transformers"
    task = "image-classification" if f.kind == "classifier" else "image-feature-extraction"
    tags = ["convnextv2", "image-classification" if f.kind == "classifier" else "fcmae",
            library]
    lines = ["---", f"license: {f.license}", f"library_name: {library}", f"pipeline_tag: {task}",
             "tags:", *[f"- {t}" for t in tags], "---", "", f"# {f.repo_id.split('/')[-1]}", ""]
    size = f"{f.params / 1e6:.2f}M parameters, {f.macs / 1e9:.3g} GMACs at {f.img_size} px"
    if f.kind == "classifier":
        lines.append(f"A ConvNeXt V2 image classifier ({f.variant}; {size}) for "
                     f"{len(f.classes)} classes, fine-tuned with the `convnextv2` package.")
    else:
        lines.append(f"A ConvNeXt V2 encoder ({f.variant}; {size}) pretrained with FCMAE "
                     f"(fully convolutional masked autoencoder) using the `convnextv2` "
                     f"package. It has no classifier: fine-tune it for a task, or use its "
                     f"features.")
    lines += ["", "## Task and data", ""]
    if f.kind == "classifier":
        shown = ", ".join(f.classes[:20]) + (f", ... ({len(f.classes)} in all)"
                                             if len(f.classes) > 20 else "")
        lines.append(f"- Task: image classification; classes: {shown}.")
    else:
        lines.append("- Task: self-supervised masked image modelling; the decoder is not "
                     "included.")
    lines.append(f"- Training data: {f.data or 'not recorded'}.")
    p = f.preprocessing
    lines.append(f"- Input: {f.model_config.get('in_chans', 3)}-channel images, {f.img_size} px; "
                 f"{p['interpolation']} resize to {f.img_size} / crop_pct, centre crop "
                 f"(crop_pct {p['crop_pct']}), normalised with mean {p['mean']} and std "
                 f"{p['std']}.")
    if p.get("small_image"):
        lines.append(f"- The run itself evaluated with the small-image rule (no resize: smaller "
                     f"images zero-padded to {f.img_size} px, larger ones scaled down); the "
                     f"resize above is the nearest setting timm and transformers offer.")
    lines += ["", "## Recipe", ""]
    if f.recipe:
        lines += ["| setting | value |", "| --- | --- |",
                  *[f"| {k} | {_number(v)} |" for k, v in f.recipe.items()]]
    if f.command and f.replay:
        lines += ["", f"Every option of the run is in `{f.replay}` (uploaded with the weights); "
                  f"this repeats it, and a flag after `--config` changes one option (e.g. "
                  f"`--data` where your copy of the data lives):", "", "```bash",
                  f"convnextv2 {f.command} --config {f.replay} --output NEW_RUN_FOLDER", "```"]
    elif f.command:
        lines += ["", f"Trained with `convnextv2 {f.command}`."]
    lines += ["", "## Metrics", "", f"From the run's `summary.json` ({f.source}):", ""]
    if f.metrics:
        lines += ["| metric | value |", "| --- | --- |",
                  *[f"| {name} | {value} |" for name, value in f.metrics]]
    else:
        lines.append("No summary.json was found beside the weights: no metrics recorded.")
    lines += ["", "## Model", "", "| parameters | GMACs | input | depths | widths |",
              "| --- | --- | --- | --- | --- |",
              f"| {f.params / 1e6:.2f}M | {f.macs / 1e9:.3g} | {f.img_size} px | "
              f"{list(f.model_config['depths'])} | {list(f.model_config['dims'])} |"]
    if f.reconstruction:
        lines += ["", "## Reconstructions", "",
                  "Original, masked input, reconstruction, and reconstruction with the visible "
                  "patches pasted back, at the end of pretraining:", "",
                  f"![FCMAE reconstructions]({f.reconstruction})"]
    lines += ["", "## Usage", "", "```python", *_usage(f), "```", "",
              "## License", "", f"{f.license} (the `license` field above).", ""]
    return "\n".join(lines)


def _usage(f: CardFacts) -> list[str]:
    if f.layout == "timm":
        return ["import timm", "", f'model = timm.create_model("hf-hub:{f.repo_id}", '
                f"pretrained=True).eval()",
                "config = timm.data.resolve_data_config({}, model=model)",
                "transform = timm.data.create_transform(**config)"]
    head = "ForImageClassification" if f.kind == "classifier" else "Model"
    return [f"from transformers import AutoImageProcessor, ConvNextV2{head}", "",
            f'processor = AutoImageProcessor.from_pretrained("{f.repo_id}")',
            f'model = ConvNextV2{head}.from_pretrained("{f.repo_id}").eval()']
