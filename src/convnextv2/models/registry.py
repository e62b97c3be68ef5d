"""``create_model``: a variant's architecture by name, with fresh weights.

Loading weights is the checkpoint package's job, which sits above the models:
``convnextv2.create_model`` (``checkpoint/create.py``) builds through this function and then
loads ``pretrained=``. Keeping the two apart lets everything that only needs the network
(the FCMAE encoder, the recipes, the benchmarks) import it without the checkpoint readers.
"""
from __future__ import annotations

from torch import nn

from .model import ConvNeXtV2, FeatureExtractor
from .variants import model_config


def create_model(name: str, features_only: bool = False, out_indices=(0, 1, 2, 3),
                 **kwargs) -> nn.Module:
    """Build a variant by name (``convnextv2_atto`` ... ``convnextv2_huge``), randomly
    initialised.

    ``kwargs`` override the constructor (``num_classes``, ``in_chans``, ``drop_path_rate``,
    ``head_init_scale``, ``depths``, ``dims``, ``stem_stride``, ``use_grn``,
    ``layer_scale_init_value``). ``features_only=True`` returns the stage maps of
    ``out_indices`` instead of logits. For weights use ``convnextv2.create_model``.
    """
    if "pretrained" in kwargs or "drop_head" in kwargs:
        raise TypeError("convnextv2.models.registry.create_model builds architectures only; "
                        "for pretrained= (and drop_head=) use convnextv2.create_model")
    model = ConvNeXtV2(**model_config(name, **kwargs))
    return FeatureExtractor(model, out_indices) if features_only else model
