"""``create_model`` with weights: the package's front door (``convnextv2.create_model``).

It lives here, not in ``models/``, because loading weights needs the checkpoint readers and
the models sit below them; ``models.registry.create_model`` builds the bare architecture.
"""
from __future__ import annotations

from torch import nn

from ..models.model import FeatureExtractor
from ..models.registry import create_model as create_architecture
from .hub import load_pretrained


def create_model(name: str, pretrained=None, features_only: bool = False,
                 out_indices=(0, 1, 2, 3), drop_head: bool | None = None,
                 **kwargs) -> nn.Module:
    """Build a variant by name (``convnextv2_atto`` ... ``convnextv2_huge``), optionally with
    weights.

    ``kwargs`` override the constructor (``num_classes``, ``in_chans``, ``drop_path_rate``,
    ``head_init_scale``, ``depths``, ``dims``, ``stem_stride``, ``use_grn``,
    ``layer_scale_init_value``). ``pretrained`` is a checkpoint path in any known layout or a
    hub id such as ``timm/convnextv2_atto.fcmae``. ``features_only=True`` returns the four
    stage maps instead of logits. ``drop_head=True`` keeps a freshly initialised classifier
    when the checkpoint's head has another size; by default (``None``) that is allowed only
    for encoder-only checkpoints (FCMAE weights), which carry no head at all.
    """
    model = create_architecture(name, **kwargs)
    if pretrained:
        load_pretrained(model, pretrained, drop_head=drop_head)
    return FeatureExtractor(model, out_indices) if features_only else model
