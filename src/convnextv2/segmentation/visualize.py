"""Colour maps of predicted classes over the image, and the raw class-index PNGs that
benchmark servers take."""
from __future__ import annotations

import colorsys

import numpy as np
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


def network_stride(model) -> int:
    """The backbone's total stride: the smallest input side it can take."""
    return int(model.config["backbone"].get("stem_stride", 4)) * 8


def check_input_size(model, height: int, width: int, size: int | None, name="image") -> None:
    """Refuse an image that the test resize to short side ``size`` leaves smaller than the
    network's stride (a 3x3 image, or a 1x5000 strip): one line naming it."""
    from .transforms import keep_ratio_scale, scaled_size

    h, w = (scaled_size(height, width, keep_ratio_scale(height, width, 4 * size, size))
            if size else (height, width))
    least = network_stride(model)
    if min(h, w) < least:
        raise ValueError(f"image {name} is {width}x{height} px ({w}x{h} after the test "
                         f"resize): too small for the network, which needs at least {least} "
                         f"px on each side")


@torch.no_grad()
def predict_classes(model, pixels: torch.Tensor, size: int | None, mode: str, window: int,
                    stride: int, device="cpu", name="image") -> torch.Tensor:
    """Class index per pixel (H, W) of a uint8 image (3, H, W): rescaled by the test rule to
    short side ``size`` (None: as it is), inferred by ``mode``, scored at the original size.
    An image too small for the network after the rescale is a one-line ValueError."""
    from .inference import predict_scores
    from .transforms import eval_transforms

    model.eval()
    h, w = pixels.shape[-2:]
    check_input_size(model, h, w, size, name)
    x, _ = eval_transforms(size)(pixels, torch.zeros(h, w, dtype=torch.int64))
    scores = predict_scores(model, x[None].to(device), (h, w), mode, window, stride)
    return scores.argmax(1)[0].cpu()


def draw_classes(pixels: torch.Tensor, pred: torch.Tensor, classes, num_classes: int,
                 alpha: float = 0.55):
    """The colour map of ``pred`` over ``pixels`` and each present class's share of the
    pixels."""
    from torchvision.utils import draw_segmentation_masks

    present = pred.unique().tolist()
    colours = palette(num_classes)
    drawn = draw_segmentation_masks(pixels, torch.stack([pred == c for c in present]),
                                    alpha=alpha, colors=[colours[c] for c in present])
    share = {(classes[c] if c < len(classes) else str(c)): float((pred == c).float().mean())
             for c in present}
    return drawn, share


def label_png(pred: torch.Tensor, reduce_zero_label: bool = True) -> np.ndarray:
    """The ADE20K submission format: one uint8 class index per pixel, numbered as the
    annotations are (class k stored as k + 1, 0 = unlabelled, which is never predicted);
    for a model trained with ``reduce_zero_label`` off, the index itself."""
    values = pred.numpy().astype(np.int64) + (1 if reduce_zero_label else 0)
    if values.max(initial=0) > 255:
        raise ValueError(f"class index {int(values.max())} does not fit an 8-bit label PNG")
    return values.astype(np.uint8)


def predict_and_draw(model, pixels: torch.Tensor, classes, alpha: float = 0.55, device="cpu",
                     name: str = "image", **test):
    """``pixels``: uint8 (3, H, W), predicted as the model's test settings say (``test``
    overrides them: mode, size, window, stride). Returns the drawn uint8 image, each present
    class's share of the pixels, and the class map."""
    from .inference import test_settings

    t = test_settings(model.config, **test)
    pred = predict_classes(model, pixels, t["size"], t["mode"], t["window"], t["stride"],
                           device, name)
    drawn, share = draw_classes(pixels, pred, classes, model.num_classes, alpha)
    return drawn, share, pred
