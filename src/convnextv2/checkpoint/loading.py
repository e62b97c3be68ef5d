"""Loading checkpoints of any layout into a ``ConvNeXtV2``, and building one from a file."""
from __future__ import annotations

import json
from typing import Mapping

import torch
from torch import nn

from . import layouts
from .errors import CheckpointError, preview
from .io import read_state_dict

HEAD_FC = ("head.fc.weight", "head.fc.bias")
HEAD_NORM = ("head.norm.weight", "head.norm.bias")
STEM_CONV = "stem.conv.weight"


def _shape(t) -> tuple:
    return tuple(t.shape)


def _fmt_shape(s) -> str:
    return str(tuple(int(d) for d in s))


def _variant_hint(native: Mapping[str, torch.Tensor]) -> str:
    """' (the checkpoint looks like convnextv2_atto: ...)' when its shapes say so."""
    try:
        cfg = layouts.infer_config(native)
    except CheckpointError:
        return ""
    from ..models.variants import VARIANTS
    name = next((n for n, v in VARIANTS.items()
                 if list(v["depths"]) == cfg["depths"] and list(v["dims"]) == cfg["dims"]), None)
    what = f"depths {cfg['depths']}, dims {cfg['dims']}, {cfg['num_classes']} classes"
    return f" (the checkpoint holds {name + ': ' if name else ''}{what})"


def _head_classes(native, key="head.fc.weight") -> int:
    return int(native[key].shape[0]) if key in native else 0


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A stem kernel trained on RGB, made to take ``in_chans`` channels (what timm's
    ``adapt_input_conv`` does, so weights adapted here and there agree).

    One channel: the sum of the three colour kernels, so a grey image g gives exactly what the
    RGB image (g, g, g) gave. k channels: the colour kernels repeated (R, G, B, R, ...) up to k
    and scaled by 3/k, so that k equal channels again respond like that RGB image and the
    activations keep the scale the rest of the network was trained on. Computed in float32
    and returned in the kernel's own dtype."""
    out_chs, have = weight.shape[:2]
    if have != 3:
        raise CheckpointError(f"the checkpoint's stem takes {have} channels; only 3-channel "
                              f"(RGB) stems can be adapted to {in_chans}")
    kernel = weight.float()
    if in_chans == 1:
        adapted = kernel.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // have)
        adapted = kernel.repeat(1, repeats, 1, 1)[:, :in_chans] * (have / in_chans)
    return adapted.to(weight.dtype)


def _adapt_stem(native: dict, expected: Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    """``native`` with an RGB stem kernel adapted to the model's input channels, and what
    the load report says about the stem."""
    ours, theirs = expected.get(STEM_CONV), native.get(STEM_CONV)
    if ours is None or theirs is None or _shape(ours) == _shape(theirs):
        return native, "loaded"
    same_kernel = theirs.ndim == 4 and theirs.shape[0] == ours.shape[0] \
        and theirs.shape[2:] == ours.shape[2:]
    if not same_kernel or theirs.shape[1] != 3:
        return native, "loaded"  # another variant or stem: reported as mis-shaped below
    k = int(ours.shape[1])
    how = "summed over RGB" if k == 1 else f"RGB kernels repeated and scaled by 3/{k}"
    native = dict(native)
    native[STEM_CONV] = adapt_input_channels(theirs, k)
    return native, f"adapted from 3 to {k} input channels ({how})"


def load_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
               drop_head: bool | None = False, source: str = "the given state dict",
               metadata: Mapping[str, str] | None = None) -> dict:
    """Load an already-read ``state_dict`` (any layout) into ``model``; see ``load_checkpoint``."""
    layout = layouts.detect_layout(state_dict)
    native, ignored, unplaced = layouts.to_native(state_dict, layout)
    expected = model.state_dict()
    native, stem = _adapt_stem(native, expected)
    has_head = any(k in native for k in HEAD_FC)
    encoder_only = not has_head and not any(k in native for k in HEAD_NORM)
    allow_missing_head = bool(drop_head) or (drop_head is None and encoder_only)

    head = "loaded" if has_head else "absent"
    ckpt_classes = _head_classes(native)
    model_classes = _head_classes(expected)
    # another class count is a head question; other head shape errors mean another variant
    head_differs = has_head and ckpt_classes != model_classes
    if has_head and drop_head:
        head = f"dropped ({ckpt_classes} classes in the checkpoint; model head kept as initialised)"
        native = {k: v for k, v in native.items() if k not in HEAD_FC}
    elif head_differs:
        raise CheckpointError(
            f"{source}: checkpoint head has {ckpt_classes} classes, model has {model_classes}"
            f"{' (no classifier)' if model_classes == 0 else ''}; pass drop_head=True to "
            f"re-initialise it")

    missing = [k for k in expected if k not in native]
    if allow_missing_head:
        missing = [k for k in missing if k not in HEAD_FC + HEAD_NORM]
    unexpected = [k for k in native if k not in expected]
    mismatched = {k: (_shape(v), _shape(expected[k])) for k, v in native.items()
                  if k in expected and _shape(v) != _shape(expected[k])}
    if mismatched or (strict and (missing or unexpected or unplaced)):
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} mis-shaped: " + preview(
                f"{k} checkpoint {_fmt_shape(a)} vs model {_fmt_shape(b)}"
                for k, (a, b) in mismatched.items()))
        if strict and missing:
            parts.append(f"{len(missing)} missing from the checkpoint: {preview(missing)}")
        if strict and (unexpected or unplaced):
            extra = unexpected + list(unplaced)  # unplaced keys keep their original names
            parts.append(f"{len(extra)} unexpected in the checkpoint: {preview(extra)}")
        cfg = getattr(model, "config", None) or {}
        wanted = (f" (depths {list(cfg['depths'])}, dims {list(cfg['dims'])})"
                  if "depths" in cfg and "dims" in cfg else "")
        raise CheckpointError(
            f"{source} ({layout} layout) does not fit the model{wanted}"
            f"{_variant_hint(native)}: "
            + "; ".join(parts), missing=missing, unexpected=unexpected + list(unplaced),
            mismatched=mismatched)

    usable = {k: v for k, v in native.items() if k in expected}
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:  # built without memory: take the checkpoint's tensors as the parameters
        usable = {k: v.to(expected[k].dtype) if v.is_floating_point() else v
                  for k, v in usable.items()}
    model.load_state_dict(usable, strict=False, assign=on_meta)
    return dict(source=source, layout=layout, loaded=len(usable), missing=missing,
                unexpected=unexpected + list(unplaced), ignored=ignored, head=head,
                stem=stem, metadata=dict(metadata or {}))


def load_checkpoint(model: nn.Module, source, strict: bool = True,
                    drop_head: bool | None = False, key: str | None = None) -> dict:
    """Load ``source`` into ``model`` whatever its layout, and report what happened.

    ``source``: a path (.pt .pth .bin .safetensors, or an HF folder) or a state dict, possibly
    wrapped in ``model`` / ``model_ema`` / ``state_dict`` (``key`` picks one) and prefixed with
    ``module.``. Layouts: native, official dense, official FCMAE, timm, HF transformers; FCMAE
    decoder keys are ignored. A head of another size is an error unless ``drop_head=True``,
    which leaves the model's head as initialised and also accepts encoder-only checkpoints
    (``drop_head=None`` accepts only those). Returns a dict with ``layout``, ``loaded``,
    ``missing``, ``unexpected``, ``ignored``, ``head`` and the file's ``metadata``.
    """
    state_dict, metadata, description = read_state_dict(source, key)
    return load_state(model, state_dict, strict=strict, drop_head=drop_head,
                      source=description, metadata=metadata)


def infer_config(source, key: str | None = None) -> dict:
    """``ConvNeXtV2`` constructor arguments for a checkpoint (path or state dict, any layout):
    a native file's stored config, else what the tensor shapes say."""
    state_dict, metadata, _ = read_state_dict(source, key)
    return _config_of(state_dict, metadata)


def _config_of(state_dict, metadata) -> dict:
    native, _, _ = layouts.to_native(state_dict)
    shapes = layouts.infer_config(native)
    stored = metadata.get("config") if metadata else None
    if stored:
        config = json.loads(stored) if isinstance(stored, str) else dict(stored)
        config.setdefault("num_classes", shapes["num_classes"])
        return config
    return shapes


def load_model(source, key: str | None = None, strict: bool = True,
               drop_head: bool | None = None, **overrides) -> nn.Module:
    """A ``ConvNeXtV2`` built from the checkpoint alone and loaded with its weights.

    ``overrides`` change constructor arguments (``drop_path_rate``, ``num_classes``, ...); a
    ``num_classes`` other than the checkpoint's re-initialises the head. The file's metadata is
    kept on ``model.checkpoint_metadata`` and its ``class_names`` (if any) on ``model.class_names``.
    """
    from ..models.model import ConvNeXtV2

    state_dict, metadata, description = read_state_dict(source, key)
    config = _config_of(state_dict, metadata)
    config.update({k: v for k, v in overrides.items() if v is not None})
    ckpt_classes = layouts.infer_config(layouts.to_native(state_dict)[0])["num_classes"]
    if drop_head is None and ckpt_classes and config.get("num_classes") != ckpt_classes:
        drop_head = True  # the caller asked for another class count
    with torch.device("meta"):
        model = ConvNeXtV2(**config)
    report = load_state(model, state_dict, strict=strict, drop_head=drop_head,
                        source=description, metadata=metadata)
    _materialise(model)
    model.checkpoint_metadata = dict(metadata)
    model.load_report = report
    if "class_names" in metadata:
        names = metadata["class_names"]
        model.class_names = json.loads(names) if isinstance(names, str) else list(names)
    return model


def _materialise(model: nn.Module) -> None:
    """Give parameters the checkpoint did not provide (a dropped head, absent final norm)
    real memory and their normal initial values."""
    from ..models.model import init_weights
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own or not any(p.is_meta for p in own):
            continue
        module.to_empty(device="cpu", recurse=False)
        if isinstance(module, nn.LayerNorm):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init_weights(module)
            if module is getattr(model.head, "fc", None):
                scale = model.config.get("head_init_scale", 1.0)
                with torch.no_grad():
                    module.weight.mul_(scale)
                    module.bias.mul_(scale)
        else:
            with torch.no_grad():
                for p in own:
                    p.zero_()  # GRN starts at 0 (identity); layer scale is always in the file
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise CheckpointError(f"buffer {name} was not provided by the checkpoint")
