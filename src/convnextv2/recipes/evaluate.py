"""Evaluation (top-1, top-5, loss, per-class accuracy, confusion matrix) and prediction.

Both work on any classifier module returning logits; class names come from the checkpoint's
metadata, or ImageNet's names for 1000-class models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

# the scoring loop is the training engine's (validation during fine-tuning uses it too)
from ..training.dist_eval import evaluate  # noqa: F401  (part of this module's API)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Save the confusion matrix (row-normalised colours, counts written in cells) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    k = len(cm)
    names = list(classes) if len(classes) == k else [str(i) for i in range(k)]
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, min(0.5 * k + 2, 24))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), names, rotation=90)
        ax.set_yticks(range(k), names)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def imagenet_class_names() -> list[str]:
    """ImageNet-1k class names from torchvision's weight metadata (bundled, no download)."""
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_names(num_classes: int, stored: Sequence[str] | None = None) -> list[str]:
    """Names for the model's outputs: the checkpoint's own, ImageNet's for 1000 classes, else
    the class indices as strings."""
    if stored and len(stored) == num_classes:
        return list(stored)
    if num_classes == 1000:
        try:
            return imagenet_class_names()
        except Exception:  # torchvision without the metadata: fall back to indices
            pass
    return [str(i) for i in range(num_classes)]


@torch.no_grad()
def predict(model: nn.Module, images: Sequence, transform, classes: Sequence[str],
            topk: int = 5, device: torch.device | str = "cpu") -> list[list[tuple[str, float]]]:
    """Top-``topk`` (class name, probability) pairs for each image (PIL images or paths)."""
    from PIL import Image

    model.eval()
    batch = []
    for img in images:
        if not isinstance(img, Image.Image):
            with Image.open(img) as opened:
                img = opened.copy()
        batch.append(transform(img))
    probs = model(torch.stack(batch).to(device)).float().softmax(dim=1)
    k = min(topk, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [[(classes[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)]


def checkpoint_info(path: str | Path) -> dict:
    """What a native checkpoint written by ``finetune`` says about itself: ``class_names``,
    ``img_size``, ``in_chans`` (missing keys are absent; other layouts give ``{}``)."""
    import json

    from .. import checkpoint as ckpt
    try:
        meta = ckpt.read_metadata(path) or {}
    except Exception:
        return {}
    info = {}
    for key, value in dict(meta).items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        info[key] = value
    return info


def load_classifier(checkpoint: str | Path, model_name: str | None = None, key: str | None = None,
                    **overrides) -> tuple[nn.Module, dict]:
    """A model ready for inference from ``checkpoint`` (any layout) and its info dict.

    With ``model_name`` the variant is built (``overrides`` applied, the class count taken from
    the checkpoint) and the weights loaded into it; without, the checkpoint must describe the
    architecture itself (native files do; other layouts are inferred from tensor shapes).
    ``key`` picks an entry of a training checkpoint: ``model_ema`` in the official ones,
    ``ema`` in the run states ``finetune`` writes."""
    from ..checkpoint import load_model, resolve_checkpoint

    from ..checkpoint.hub import catalogue_entry

    released = None if Path(str(checkpoint)).exists() else catalogue_entry(str(checkpoint))
    checkpoint = str(resolve_checkpoint(str(checkpoint)))  # a released name: fetched
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    info = checkpoint_info(checkpoint)
    if released is not None:  # released weights were trained at their own input size
        info.setdefault("img_size", released.input_size)
    model = load_model(checkpoint, key=key, **{k: v for k, v in overrides.items() if v is not None})
    if model_name:
        from ..models.variants import model_config
        want = model_config(model_name)
        got = model.config
        if list(want["depths"]) != list(got["depths"]) or list(want["dims"]) != list(got["dims"]):
            raise ValueError(f"--model {model_name} has depths {list(want['depths'])} dims "
                             f"{list(want['dims'])}, but {checkpoint} holds depths "
                             f"{list(got['depths'])} dims {list(got['dims'])}")
    model.eval()
    return model, info
