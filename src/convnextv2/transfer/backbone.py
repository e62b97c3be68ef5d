"""The ConvNeXt V2 backbone of the detector and the segmenter, from any checkpoint.

Detection and segmentation heads need the four stage maps (strides 4, 8, 16, 32), not logits.
ConvNeXt's dense-prediction backbones also put a channel LayerNorm on each map they hand out:
the stage outputs of a network trained for classification are unnormalised residual streams
whose scale grows with depth, and the heads (FPN, UPerNet) train better on normalised inputs.
Those four norms are new parameters (no checkpoint has them), trained at the full rate.

Weights come through the package's own checkpoint reader, so anything it reads works with no
key surgery: a ``convnextv2 pretrain`` encoder file, a fine-tuned classifier (its head is
dropped), the official dense or FCMAE files, timm and Hugging Face layouts.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.model import FeatureExtractor, LayerNorm2d


class ConvNeXtBackbone(nn.Module):
    """Four stage maps of a ConvNeXt V2, each through its own channel LayerNorm.

    Parameter names below ``body.`` are the classifier's (``stem.*``, ``stages.S.*``), which is
    what the layer-wise lr decay rule reads; ``out_norms.*`` are the added output norms.
    """

    def __init__(self, features: FeatureExtractor, out_norms: bool = True):
        super().__init__()
        self.body = features
        self.config = dict(features.config)
        self.channels = list(features.channels)
        self.reductions = list(features.reductions)
        self.out_norms = nn.ModuleList(
            LayerNorm2d(c) if out_norms else nn.Identity() for c in self.channels)

    @property
    def depths(self) -> list[int]:
        return list(self.config["depths"])

    def set_grad_checkpointing(self, enable: bool = True, granularity: str = "block") -> None:
        """Gradient checkpointing of the ConvNeXt stages (``ConvNeXtV2.set_grad_checkpointing``):
        what lets detection at 1024 px fit an ordinary GPU. The output norms run as before."""
        self.body.set_grad_checkpointing(enable, granularity)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [norm(f) for norm, f in zip(self.out_norms, self.body(x))]


def build_backbone(model: str | None = None, pretrained: str | None = None,
                   drop_path_rate: float = 0.0, out_norms: bool = True,
                   **overrides) -> ConvNeXtBackbone:
    """A ``ConvNeXtBackbone`` by variant name, by checkpoint, or both.

    ``model``: a variant (``convnextv2_tiny``, ``atto`` ...); ``None`` with ``pretrained`` builds
    whatever shape the checkpoint holds. ``pretrained``: a checkpoint path, a released name
    (``convnextv2_tiny.fcmae``) or a hub id, in any layout the package reads; a classifier
    head in it is dropped and an RGB stem is adapted to ``in_chans``. ``overrides``: constructor
    arguments (``depths``, ``dims``, ``in_chans``, ``stem_stride``) for custom shapes.
    ``drop_path_rate``: stochastic depth, rising linearly over the blocks as in the classifier
    (the detection recipes use 0.2-0.5, segmentation 0.1-0.4).
    """
    from ..models.model import ConvNeXtV2
    from ..models.variants import model_config

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if pretrained is not None:
        from ..checkpoint import resolve_checkpoint
        pretrained = resolve_checkpoint(pretrained)  # a released name: fetched
    if model is None and pretrained is None and not {"depths", "dims"} <= set(overrides):
        raise ValueError("give a backbone: --model NAME, --pretrained CHECKPOINT, or both")
    if model is None and pretrained is not None:
        from ..checkpoint import load_model
        net = load_model(pretrained, drop_head=True, drop_path_rate=drop_path_rate,
                         num_classes=0, **overrides)
    else:
        config = (model_config(model, **overrides) if model is not None else dict(overrides))
        config.update(num_classes=0, drop_path_rate=drop_path_rate)
        net = ConvNeXtV2(**config)
        if pretrained is not None:
            from ..checkpoint import load_pretrained
            load_pretrained(net, pretrained, drop_head=True)
    return ConvNeXtBackbone(FeatureExtractor(net, (0, 1, 2, 3)), out_norms=out_norms)


def backbone_config(backbone: ConvNeXtBackbone) -> dict:
    """The constructor arguments that rebuild ``backbone``'s shape (saved with trained models)."""
    keys = ("in_chans", "depths", "dims", "stem_stride", "use_grn", "layer_scale_init_value",
            "drop_path_rate")
    return {k: backbone.config[k] for k in keys if k in backbone.config}

