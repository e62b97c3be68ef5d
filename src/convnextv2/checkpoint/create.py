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
from .hub import catalogue_entry, load_entry, load_pretrained


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

    Released weights follow timm's conventions: an FCMAE encoder (tag ``fcmae``) builds
    without a classifier (``num_classes=0``) unless ``num_classes`` is given, and another
    ``num_classes`` than the checkpoint's gets a freshly initialised head. ``in_chans`` other
    than 3 adapts the released RGB stem (see ``load_state``); ``model.load_report`` says what
    was loaded. ``features_only=True`` returns the four stage maps instead of logits.
    ``drop_head=True`` keeps a freshly initialised classifier when the checkpoint's head has
    another size; by default (``None``) that is allowed only for encoder-only checkpoints.
    """
    variant, _, tag = name.partition(".")
    entry = _released_entry(variant, tag, pretrained)
    if entry is not None:
        if entry.encoder_only:
            kwargs.setdefault("num_classes", 0)
        wanted = kwargs.get("num_classes")
        if drop_head is None and wanted is not None and wanted != entry.num_classes:
            drop_head = True  # another class count: a new head, as timm does
    model = create_architecture(variant, **kwargs)
    if entry is not None:
        model.load_report = load_entry(model, entry, drop_head=drop_head)
    elif pretrained:
        model.load_report = load_pretrained(model, pretrained, drop_head=drop_head)
    return FeatureExtractor(model, out_indices) if features_only else model


def _released_entry(variant: str, tag: str, pretrained):
    """The catalogue entry ``pretrained`` asks for: ``True`` (the name's tag, else the
    default), a tag (``"fcmae_ft_in1k"``) or a released name; None for a path or hub id."""
    from ..models.variants import resolve_name

    if pretrained is True:
        return lookup(resolve_name(variant), tag or None)
    if not isinstance(pretrained, str) or Path(pretrained).expanduser().exists():
        return None
    if "/" not in pretrained and "." not in pretrained:  # a tag; an unreleased one is refused
        return lookup(resolve_name(variant), pretrained)
    return catalogue_entry(pretrained)
