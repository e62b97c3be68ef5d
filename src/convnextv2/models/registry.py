"""``create_model``: a variant by name, optionally with weights from any checkpoint layout."""
from __future__ import annotations

from torch import nn

from .model import ConvNeXtV2, FeatureExtractor
from .variants import V1_BLOCK, VARIANTS, block_kwargs, list_models, model_config, resolve_name  # noqa: F401


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
        from ..checkpoint import load_pretrained
        load_pretrained(model, pretrained, drop_head=drop_head)
    if features_only:
        return FeatureExtractor(model, out_indices)
    return model
