"""``create_model`` with weights: the package's front door (``convnextv2.create_model``).

It lives here, not in ``models/``, because loading weights needs the checkpoint readers and
the models sit below them; ``models.registry.create_model`` builds the bare architecture.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.model import FeatureExtractor
from ..models.registry import create_model as create_architecture
from .catalog import lookup
from .hub import load_entry, load_pretrained


def create_model(name: str, pretrained=None, features_only: bool = False,
                 out_indices=(0, 1, 2, 3), drop_head: bool | None = None,
                 **kwargs) -> nn.Module:
    """Build a variant by name (``convnextv2_atto`` ... ``convnextv2_huge``), optionally with
    weights.

    ``kwargs`` override the constructor (``num_classes``, ``in_chans``, ``drop_path_rate``,
    ``head_init_scale``, ``depths``, ``dims``, ``stem_stride``, ``use_grn``,
    ``layer_scale_init_value``). ``pretrained``:

    - ``True``: the released weights the name's tag names
      (``convnextv2_tiny.fcmae_ft_in22k_in1k_384``), or for a bare name the default tag
      (``checkpoint.catalog.default_tag``); fetched and cached on first use;
    - a tag of the variant (``create_model("convnextv2_tiny", pretrained="fcmae_ft_in1k")``);
    - a catalogue name, a checkpoint path in any known layout, or a hub id such as
      ``facebook/convnextv2-atto-1k-224``.

    ``in_chans`` other than 3 adapts the released stem (see ``load_state``).
    ``features_only=True`` returns the four stage maps instead of logits. ``drop_head=True``
    keeps a freshly initialised classifier when the checkpoint's head has another size; by
    default (``None``) that happens for encoder-only checkpoints (FCMAE weights, which carry
    no head) and, for released weights, when ``num_classes`` asks for another class count.
    """
    variant, _, tag = name.partition(".")
    model = create_architecture(variant, **kwargs)
    entry = _released_entry(model, variant, tag, pretrained)
    if entry is not None:
        wanted = kwargs.get("num_classes")
        if drop_head is None and wanted is not None and wanted != entry.num_classes:
            drop_head = True  # another class count: a new head, as timm does
        model.load_report = load_entry(model, entry, drop_head=drop_head)
    elif pretrained:
        model.load_report = load_pretrained(model, pretrained, drop_head=drop_head)
    return FeatureExtractor(model, out_indices) if features_only else model


def _released_entry(model: nn.Module, variant: str, tag: str, pretrained):
    """The catalogue entry ``pretrained=True`` or ``pretrained=TAG`` asks for, or None when
    ``pretrained`` is a path, a full name or a hub id (``load_pretrained`` handles those)."""
    from ..models.variants import resolve_name

    if pretrained is True:
        return lookup(resolve_name(variant), tag or None)
    if isinstance(pretrained, str) and "/" not in pretrained and "." not in pretrained:
        if not Path(pretrained).exists():  # a tag; an unreleased one: the error lists them
            return lookup(resolve_name(variant), pretrained)
    return None
