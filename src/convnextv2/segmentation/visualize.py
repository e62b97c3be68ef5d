"""Colour maps of predicted classes over the image."""
from __future__ import annotations

import colorsys

import torch


def palette(n: int) -> list[tuple[int, int, int]]:
    """A fixed colour per class (golden-ratio hue steps), the same in every image and run."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95))
            for i in range(n)]


def load_segmenter(checkpoint):
    """A trained segmenter and its class names from a run's ``model.pt`` (or run folder)."""
    from ..transfer.engine import read_model_file
    from .model import segmenter_from_config

    ckpt = read_model_file(checkpoint, "segmentation")
    model = segmenter_from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model, list(ckpt.get("classes") or ckpt["config"].get("class_names") or [])


@torch.no_grad()
def predict_and_draw(model, pixels: torch.Tensor, classes, alpha: float = 0.55, device="cpu"):
    """``pixels``: uint8 (3, H, W). Returns the drawn uint8 image and each present class's
    share of the pixels."""
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_segmentation_masks

    model.eval()
    x = F.to_dtype(pixels, torch.float32, scale=True)[None].to(device)
    pred = model(x)["out"].argmax(1)[0].cpu()
    present = pred.unique().tolist()
    colours = palette(model.num_classes)
    drawn = draw_segmentation_masks(pixels, torch.stack([pred == c for c in present]),
                                    alpha=alpha, colors=[colours[c] for c in present])
    share = {(classes[c] if c < len(classes) else str(c)): float((pred == c).float().mean())
             for c in present}
    return drawn, share
