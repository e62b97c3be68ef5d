"""UPerNet on a ConvNeXt V2 backbone, the paper's ADE20K setup.

UPerNet (Xiao et al., 2018) fuses the four stage maps twice: a pyramid pooling module (PPM)
summarises the stride-32 map at several grid sizes (1, 2, 3, 6) for global context, then an
FPN top-down path adds that context into the finer maps, and the four resulting maps are
upsampled to stride 4, concatenated and classified per pixel. An auxiliary FCN head on the
stride-16 map (loss weight 0.4) gives the middle of the backbone a direct gradient.
Widths follow the ConvNeXt UPerNet configuration: 512 channels in the head, 256 in the
auxiliary head, dropout 0.1 before each classifier.

The heads use BatchNorm (SyncBatchNorm under multi-GPU DDP, see ``SegmentationTask``) as that
configuration does; ``norm="gn"`` switches to GroupNorm for per-process batches of 1-2. The
backbone itself has only LayerNorm.

What follows MMSegmentation's defaults (the configs the paper's numbers came from):

- Inputs are 0-1 images; the model normalises them itself with ``image_mean`` / ``image_std``
  (ImageNet's by default, what FCMAE pretraining and fine-tuning used), saved in its config,
  so training, evaluation and predict cannot disagree (as torchvision's detectors do it). The
  stem's LayerNorm normalises over channels per pixel, so it cannot absorb a per-channel
  offset: a pretrained backbone fed 0-1 images starts from the wrong point.
- Head convolutions start from Kaiming-normal (fan-out, ReLU) weights and norms from 1/0;
  the two classifiers from N(0, 0.01) with zero bias.
- The loss is cross-entropy summed over labelled pixels and divided by all pixels, ignored
  ones included (MMSegmentation's ``avg_non_ignore=False``): an image with little labelled
  area weighs less, as in the paper's training.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..transfer.backbone import ConvNeXtBackbone, backbone_config, build_backbone

IGNORE_INDEX = 255
CLASSIFIER_INIT_STD = 0.01


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"head norm {kind!r}: choose bn or gn")


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, norm: str):
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         _norm(norm, cout), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """Average-pool to each grid size, project, upsample back, concatenate with the input."""

    def __init__(self, cin: int, channels: int, scales: Sequence[int], norm: str):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(cin, channels, 1, norm))
            for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [_resize(b(x), size) for b in self.branches], dim=1)


class UPerHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 norm: str = "bn"):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales, norm)
        self.ppm_bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels,
                                          channels, 3, norm)
        self.lateral = nn.ModuleList(ConvNormAct(c, channels, 1, norm) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(ConvNormAct(channels, channels, 3, norm)
                                    for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:-1])]
        levels.append(self.ppm_bottleneck(self.ppm(feats[-1])))
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse context into finer maps
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.smooth, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv block then a 1x1 classifier."""

    def __init__(self, cin: int, num_classes: int, channels: int = 256, dropout: float = 0.1,
                 norm: str = "bn"):
        super().__init__()
        self.conv = ConvNormAct(cin, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UPerNet(nn.Module):
    """ConvNeXt V2 backbone + UPerNet head (+ auxiliary FCN head on stage 3).

    ``forward(images)`` returns ``{"out": logits}`` at the input resolution, plus ``"aux"``
    while training with the auxiliary head (the layout of torchvision's segmentation models).
    """

    def __init__(self, backbone: ConvNeXtBackbone, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux: bool = True,
                 aux_channels: int = 256, norm: str = "bn",
                 image_mean: Sequence[float] = IMAGENET_MEAN,
                 image_std: Sequence[float] = IMAGENET_STD, test: dict | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a segmenter needs at least one class, got {num_classes}")
        if channels < 1 or (aux and aux_channels < 1):
            raise ValueError(f"head widths must be >= 1, got {channels} and {aux_channels}")
        self.backbone = backbone
        self.decode_head = UPerHead(backbone.channels, num_classes, channels, pool_scales,
                                    norm=norm)
        self.aux_head = FCNHead(backbone.channels[2], num_classes, aux_channels,
                                norm=norm) if aux else None
        init_heads(self)
        self.num_classes = num_classes
        # not in the state dict: the config carries them (older files have neither)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(-1, 1, 1),
                             persistent=False)
        self.config = dict(task="segmentation", num_classes=int(num_classes),
                           channels=int(channels), pool_scales=[int(s) for s in pool_scales],
                           aux=bool(aux), aux_channels=int(aux_channels), norm=norm,
                           image_mean=[float(m) for m in image_mean],
                           image_std=[float(s) for s in image_std],
                           test=dict(test or {}), backbone=backbone_config(backbone))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """0-1 images as the backbone was trained to see them."""
        return (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: 0-1 floats (B, 3, H, W), normalised here."""
        size = images.shape[-2:]
        feats = self.backbone(self.normalize(images))
        out = {"out": _resize(self.decode_head(feats), size)}
        if self.training and self.aux_head is not None:
            out["aux"] = _resize(self.aux_head(feats[2]), size)
        return out


def init_heads(model: nn.Module) -> None:
    """MMSegmentation's initialisation of the heads: Kaiming-normal (fan-out, ReLU) convs with
    norms at weight 1 / bias 0, and N(0, 0.01) classifiers with zero bias. The backbone is
    left as it is (pretrained, or its own init)."""
    for head in (model.decode_head, model.aux_head):
        if head is None:
            continue
        for m in head.modules():
            if isinstance(m, nn.Conv2d) and m is not head.classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(head.classifier.weight, 0.0, CLASSIFIER_INIT_STD)
        nn.init.zeros_(head.classifier.bias)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy summed over the labelled pixels, divided by the count of all pixels
    (MMSegmentation's default, ``avg_non_ignore=False``)."""
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=ignore_index,
                                reduction="none")
    return per_pixel.sum() / max(target.numel(), 1)


def segmentation_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor,
                      aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX
                      ) -> dict[str, torch.Tensor]:
    """``pixel_cross_entropy`` of the main head plus ``aux_weight`` times the auxiliary
    head's. Returns the parts and their sum under ``"loss"``."""
    losses = {"loss_seg": pixel_cross_entropy(outputs["out"], target, ignore_index)}
    if "aux" in outputs:
        losses["loss_aux"] = aux_weight * pixel_cross_entropy(outputs["aux"], target,
                                                              ignore_index)
    losses["loss"] = sum(losses.values())
    return losses


def build_segmenter(num_classes: int, backbone: ConvNeXtBackbone | None = None,
                    **head_kwargs) -> UPerNet:
    backbone = backbone if backbone is not None else build_backbone("convnextv2_tiny")
    return UPerNet(backbone, num_classes, **head_kwargs)


def segmenter_from_config(config: dict) -> UPerNet:
    """Rebuild a segmenter (random weights) from the ``config`` saved with it."""
    cfg = dict(config)
    bb = dict(cfg.pop("backbone"))
    backbone = build_backbone(None, None, drop_path_rate=bb.pop("drop_path_rate", 0.0), **bb)
    for key in ("task", "class_names", "palette"):
        cfg.pop(key, None)
    # files from before the model normalised its input were trained on plain 0-1 images
    cfg.setdefault("image_mean", (0.0, 0.0, 0.0))
    cfg.setdefault("image_std", (1.0, 1.0, 1.0))
    return UPerNet(backbone, cfg.pop("num_classes"), **cfg)
