"""Named variants and ``create_model``."""
from __future__ import annotations

from torch import nn

from .model import ConvNeXtV2, FeatureExtractor

VARIANTS: dict[str, dict] = {
    "convnextv2_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
    "convnextv2_femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384)),
    "convnextv2_pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512)),
    "convnextv2_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
    "convnextv2_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnextv2_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnextv2_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "convnextv2_huge": dict(depths=(3, 3, 27, 3), dims=(352, 704, 1408, 2816)),
}


def list_models() -> list[str]:
    return list(VARIANTS)


def resolve_name(name: str) -> str:
    """Accept ``convnextv2_atto``, ``atto`` and timm-style ``convnextv2_atto.fcmae`` tags."""
    base = name.split(".")[0].lower()
    if base in VARIANTS:
        return base
    if f"convnextv2_{base}" in VARIANTS:
        return f"convnextv2_{base}"
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(VARIANTS)}")


def model_config(name: str, **overrides) -> dict:
    """The constructor arguments of a named variant with ``overrides`` applied."""
    cfg = dict(VARIANTS[resolve_name(name)])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def create_model(name: str, pretrained: str | None = None, features_only: bool = False,
                 out_indices=(0, 1, 2, 3), drop_head: bool | None = None, **kwargs) -> nn.Module:
    """Build a variant by name (``convnextv2_atto`` ... ``convnextv2_huge``).

    ``kwargs`` override the constructor (``num_classes``, ``in_chans``, ``drop_path_rate``,
    ``head_init_scale``, ``depths``, ``dims``, ``stem_stride``, ``use_grn``,
    ``layer_scale_init_value``). ``pretrained`` is a checkpoint path in any known layout or a
    hub id such as ``timm/convnextv2_atto.fcmae``. ``features_only=True`` returns the four
    stage maps instead of logits. ``drop_head=True`` keeps a freshly initialised classifier
    when the checkpoint's head has another size; by default (``None``) that is allowed only
    for encoder-only checkpoints (FCMAE weights), which carry no head at all.
    """
    model = ConvNeXtV2(**model_config(name, **kwargs))
    if pretrained:
        from .checkpoint import load_pretrained
        load_pretrained(model, pretrained, drop_head=drop_head)
    if features_only:
        return FeatureExtractor(model, out_indices)
    return model
