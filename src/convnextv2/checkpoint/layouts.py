"""Key layouts of ConvNeXt V2 checkpoints and the conversions between them.

Every conversion goes through the native layout (``ConvNeXtV2().state_dict()``): a foreign
layout only needs a table of (foreign key, native key, tensor reshaping) rules, and any two
layouts convert through it. The layouts are described in docs/design.md.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Mapping

import torch

from .errors import CheckpointError, preview

NATIVE = "native"
OFFICIAL = "official"              # facebookresearch/ConvNeXt-V2 dense (fine-tuned, *_fcmae.pt)
OFFICIAL_FCMAE = "official_fcmae"  # its FCMAE pretraining script (MinkowskiEngine layers)
TIMM = "timm"
HF = "hf"                          # HF transformers ConvNextV2Model / ForImageClassification
LAYOUTS = (NATIVE, OFFICIAL, OFFICIAL_FCMAE, TIMM, HF)
ALIASES = {"official_dense": OFFICIAL, "fcmae": OFFICIAL_FCMAE, "hf_transformers": HF,
           "transformers": HF, "huggingface": HF, "convnextv2": NATIVE}
LAYOUT_HELP = {
    NATIVE: "this package (stem.conv, stages.S.blocks.B.dwconv, head.fc)",
    OFFICIAL: "official dense (downsample_layers.*, stages.S.B.*, norm.*, head.*)",
    OFFICIAL_FCMAE: "official FCMAE pretraining (encoder.*, MinkowskiEngine .kernel/.ln/.linear)",
    TIMM: "timm convnextv2_* (stem.0, stages.S.blocks.B.conv_dw, mlp.fc1, mlp.grn)",
    HF: "HF transformers (convnextv2.embeddings.*, convnextv2.encoder.stages.*, classifier.*)",
}
# FCMAE decoder parts (official and ours share the names): never part of the classifier.
DECODER_PREFIXES = ("proj.", "mask_token", "decoder.", "pred.")
HF_PREFIX = "convnextv2."


def canonical_layout(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in LAYOUTS:
        raise CheckpointError(f"unknown layout {name!r}; known layouts: {', '.join(LAYOUTS)}")
    return key


# ---- tensor reshapes: (to native, from native) ------------------------------------------

def _same(t, **_):
    return t


def _flat(t, **_):
    return t.reshape(-1)


def _grn4(t, **_):
    return t.reshape(1, 1, 1, -1)


def _row(t, **_):
    return t.reshape(1, -1)


def _linear_from_any(t, **_):
    """timm's atto..nano build the MLP from 1x1 convs: (out, in, 1, 1) -> (out, in)."""
    return t.reshape(t.shape[0], t.shape[1]) if t.dim() == 4 else t


def _linear_to_timm(t, conv_mlp: bool = False, **_):
    return t.reshape(*t.shape, 1, 1) if conv_mlp else t


def _side(kv: int, key: str) -> int:
    k = math.isqrt(kv)
    if k * k != kv:
        raise CheckpointError(f"{key}: MinkowskiEngine kernel has {kv} offsets, not a square")
    return k


# MinkowskiEngine enumerates kernel offsets with the first spatial axis fastest, hence the
# final transpose of the two spatial axes.
def _me_conv_to_dense(t, key="", **_):
    kv, cin, cout = t.shape
    k = _side(kv, key)
    return t.permute(2, 1, 0).reshape(cout, cin, k, k).transpose(3, 2).contiguous()


def _dense_conv_to_me(t, **_):
    cout, cin, k, _k = t.shape
    return t.transpose(3, 2).reshape(cout, cin, k * k).permute(2, 1, 0).contiguous()


def _me_dw_to_dense(t, key="", **_):
    kv, c = t.shape
    k = _side(kv, key)
    return t.permute(1, 0).reshape(c, 1, k, k).transpose(3, 2).contiguous()


def _dense_dw_to_me(t, **_):
    c, _one, k, _k = t.shape
    return t.transpose(3, 2).reshape(c, k * k).permute(1, 0).contiguous()


SAME = (_same, _same)
GRN4 = (_flat, _grn4)
GRN2 = (_flat, _row)
BIAS2 = (_flat, _row)

# ---- rule tables: (foreign template, native template, reshapes) --------------------------
# {s} stage, {b} block, {p} weight|bias. First matching rule wins, so specific rules go first.
_BLOCK = "stages.{s}.blocks.{b}"
RULES: dict[str, list[tuple[str, str, tuple[Callable, Callable]]]] = {
    OFFICIAL: [
        ("downsample_layers.0.0.{p}", "stem.conv.{p}", SAME),
        ("downsample_layers.0.1.{p}", "stem.norm.{p}", SAME),
        ("downsample_layers.{s}.0.{p}", "stages.{s}.downsample.norm.{p}", SAME),
        ("downsample_layers.{s}.1.{p}", "stages.{s}.downsample.conv.{p}", SAME),
        ("stages.{s}.{b}.dwconv.{p}", _BLOCK + ".dwconv.{p}", SAME),
        ("stages.{s}.{b}.norm.{p}", _BLOCK + ".norm.{p}", SAME),
        ("stages.{s}.{b}.pwconv1.{p}", _BLOCK + ".pwconv1.{p}", SAME),
        ("stages.{s}.{b}.grn.gamma", _BLOCK + ".grn.gamma", GRN4),
        ("stages.{s}.{b}.grn.beta", _BLOCK + ".grn.beta", GRN4),
        ("stages.{s}.{b}.pwconv2.{p}", _BLOCK + ".pwconv2.{p}", SAME),
        ("stages.{s}.{b}.gamma", _BLOCK + ".layer_scale", SAME),  # ConvNeXt V1
        ("norm.{p}", "head.norm.{p}", SAME),
        ("head.{p}", "head.fc.{p}", SAME),
    ],
    OFFICIAL_FCMAE: [
        ("downsample_layers.0.0.{p}", "stem.conv.{p}", SAME),   # the stem stays dense
        ("downsample_layers.0.1.{p}", "stem.norm.{p}", SAME),
        ("downsample_layers.{s}.0.ln.{p}", "stages.{s}.downsample.norm.{p}", SAME),
        ("downsample_layers.{s}.1.kernel", "stages.{s}.downsample.conv.weight",
         (_me_conv_to_dense, _dense_conv_to_me)),
        ("downsample_layers.{s}.1.bias", "stages.{s}.downsample.conv.bias", BIAS2),
        ("stages.{s}.{b}.dwconv.kernel", _BLOCK + ".dwconv.weight", (_me_dw_to_dense, _dense_dw_to_me)),
        ("stages.{s}.{b}.dwconv.bias", _BLOCK + ".dwconv.bias", BIAS2),
        ("stages.{s}.{b}.norm.ln.{p}", _BLOCK + ".norm.{p}", SAME),
        ("stages.{s}.{b}.pwconv1.linear.{p}", _BLOCK + ".pwconv1.{p}", SAME),
        ("stages.{s}.{b}.grn.gamma", _BLOCK + ".grn.gamma", GRN2),
        ("stages.{s}.{b}.grn.beta", _BLOCK + ".grn.beta", GRN2),
        ("stages.{s}.{b}.pwconv2.linear.{p}", _BLOCK + ".pwconv2.{p}", SAME),
        ("norm.{p}", "head.norm.{p}", SAME),   # not in FCMAE files; kept so nothing is lost
        ("head.{p}", "head.fc.{p}", SAME),
    ],
    TIMM: [
        ("stem.0.{p}", "stem.conv.{p}", SAME),
        ("stem.1.{p}", "stem.norm.{p}", SAME),
        ("stages.{s}.downsample.0.{p}", "stages.{s}.downsample.norm.{p}", SAME),
        ("stages.{s}.downsample.1.{p}", "stages.{s}.downsample.conv.{p}", SAME),
        (_BLOCK + ".conv_dw.{p}", _BLOCK + ".dwconv.{p}", SAME),
        (_BLOCK + ".norm.{p}", _BLOCK + ".norm.{p}", SAME),
        (_BLOCK + ".mlp.fc1.weight", _BLOCK + ".pwconv1.weight", (_linear_from_any, _linear_to_timm)),
        (_BLOCK + ".mlp.fc1.bias", _BLOCK + ".pwconv1.bias", SAME),
        (_BLOCK + ".mlp.grn.weight", _BLOCK + ".grn.gamma", (_flat, _same)),
        (_BLOCK + ".mlp.grn.bias", _BLOCK + ".grn.beta", (_flat, _same)),
        (_BLOCK + ".mlp.fc2.weight", _BLOCK + ".pwconv2.weight", (_linear_from_any, _linear_to_timm)),
        (_BLOCK + ".mlp.fc2.bias", _BLOCK + ".pwconv2.bias", SAME),
        (_BLOCK + ".gamma", _BLOCK + ".layer_scale", SAME),
        ("head.norm.{p}", "head.norm.{p}", SAME),
        ("head.fc.{p}", "head.fc.{p}", SAME),
    ],
    HF: [  # keys as found after the "convnextv2." prefix is removed
        ("embeddings.patch_embeddings.{p}", "stem.conv.{p}", SAME),
        ("embeddings.layernorm.{p}", "stem.norm.{p}", SAME),
        ("encoder.stages.{s}.downsampling_layer.0.{p}", "stages.{s}.downsample.norm.{p}", SAME),
        ("encoder.stages.{s}.downsampling_layer.1.{p}", "stages.{s}.downsample.conv.{p}", SAME),
        ("encoder.stages.{s}.layers.{b}.dwconv.{p}", _BLOCK + ".dwconv.{p}", SAME),
        ("encoder.stages.{s}.layers.{b}.layernorm.{p}", _BLOCK + ".norm.{p}", SAME),
        ("encoder.stages.{s}.layers.{b}.pwconv1.{p}", _BLOCK + ".pwconv1.{p}", SAME),
        ("encoder.stages.{s}.layers.{b}.grn.weight", _BLOCK + ".grn.gamma", GRN4),
        ("encoder.stages.{s}.layers.{b}.grn.bias", _BLOCK + ".grn.beta", GRN4),
        ("encoder.stages.{s}.layers.{b}.pwconv2.{p}", _BLOCK + ".pwconv2.{p}", SAME),
        ("encoder.stages.{s}.layers.{b}.layer_scale_parameter", _BLOCK + ".layer_scale", SAME),
        ("layernorm.{p}", "head.norm.{p}", SAME),
        ("classifier.{p}", "head.fc.{p}", SAME),
    ],
}


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in (("s", r"\d+"), ("b", r"\d+"), ("p", "weight|bias")):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
    return re.compile(pattern + "$")


_COMPILED = {layout: [(_regex(f), f, _regex(n), n, fns) for f, n, fns in rules]
             for layout, rules in RULES.items()}


def _translate(key: str, rules, to_native: bool):
    """(new key, reshape) for the first rule that matches ``key``, or None."""
    for f_re, f_tpl, n_re, n_tpl, fns in rules:
        m = (f_re if to_native else n_re).match(key)
        if m:
            out = n_tpl if to_native else f_tpl
            return out.format(**m.groupdict()), fns[0 if to_native else 1]
    return None


# ---- detection ----------------------------------------------------------------------------

def _is_decoder_key(key: str) -> bool:
    return key.startswith(DECODER_PREFIXES)


def _encoder_view(keys) -> tuple[list[str], bool]:
    """Keys with a leading ``encoder.`` removed when the checkpoint wraps an FCMAE encoder."""
    keys = list(keys)
    if any(k.startswith("encoder.") for k in keys) and not any(
            k.startswith("encoder.stages.") and ".layers." in k for k in keys):
        return [k[len("encoder."):] for k in keys if k.startswith("encoder.")], True
    return keys, False


def detect_layout(state_dict: Mapping[str, object]) -> str:
    """Name the layout of ``state_dict`` (one of ``LAYOUTS``) from its key names and shapes."""
    keys = [str(k) for k in state_dict]
    if any(k.startswith(HF_PREFIX) or k.startswith("embeddings.patch_embeddings.") for k in keys):
        return HF
    inner, _ = _encoder_view(keys)
    sparse_marks = (".kernel", ".ln.weight", ".ln.bias", ".linear.weight", ".linear.bias")
    if any(k.startswith(("downsample_layers.", "stages.")) and k.endswith(sparse_marks)
           for k in inner):
        return OFFICIAL_FCMAE
    if any(k.startswith("downsample_layers.") for k in inner):
        return OFFICIAL
    if any(k.startswith("stem.0.") or ".conv_dw." in k or ".mlp.fc1." in k for k in inner):
        return TIMM
    if any(k.startswith("stem.conv.") or (".blocks." in k and ".dwconv." in k) for k in inner):
        return NATIVE
    shown = preview(sorted(keys), 10) if keys else "(no tensors at all)"
    known = "; ".join(f"{name}: {text}" for name, text in LAYOUT_HELP.items())
    raise CheckpointError(f"unknown checkpoint layout: none of the known layouts matches its "
                          f"{len(keys)} keys. Known layouts - {known}. Keys seen: {shown}")


# ---- conversion ---------------------------------------------------------------------------

def to_native(state_dict: Mapping[str, torch.Tensor], layout: str | None = None
              ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """``state_dict`` in the native layout, plus the decoder keys it ignored and the keys it
    could not place (by their original names)."""
    layout = canonical_layout(layout) if layout else detect_layout(state_dict)
    ignored: list[str] = []
    unplaced: list[str] = []
    items = list(state_dict.items())
    if layout == HF:
        items = [(k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k, v, k) for k, v in items]
    else:
        _, wrapped = _encoder_view(k for k, _ in items)
        stripped = []
        for k, v in items:
            if wrapped and k.startswith("encoder."):
                stripped.append((k[len("encoder."):], v, k))
            elif _is_decoder_key(k) and layout in (OFFICIAL_FCMAE, NATIVE, OFFICIAL):
                ignored.append(k)
            else:
                stripped.append((k, v, k))
        items = stripped
    out: dict[str, torch.Tensor] = {}
    if layout == NATIVE:
        out = {k: v for k, v, _ in items}
        return out, ignored, unplaced
    rules = _COMPILED[layout]
    for key, value, original in items:
        hit = _translate(key, rules, to_native=True)
        if hit is None:
            unplaced.append(original)
            continue
        new_key, fn = hit
        out[new_key] = fn(value, key=original)
    return out, ignored, unplaced


def timm_uses_conv_mlp(dims) -> bool:
    """timm builds the MLP of atto, femto, pico and nano (dims[0] <= 80) from 1x1 convs and of
    tiny and larger from Linear layers; custom widths follow the same threshold."""
    return int(dims[0]) <= 80


def from_native(native: Mapping[str, torch.Tensor], layout: str, conv_mlp: bool | None = None
                ) -> dict[str, torch.Tensor]:
    """The native ``state_dict`` written in ``layout``'s key names and shapes."""
    layout = canonical_layout(layout)
    if layout == NATIVE:
        return dict(native)
    if conv_mlp is None and layout == TIMM:
        conv_mlp = timm_uses_conv_mlp(infer_config(native)["dims"])
    rules = _COMPILED[layout]
    out: dict[str, torch.Tensor] = {}
    unplaced = []
    for key, value in native.items():
        hit = _translate(key, rules, to_native=False)
        if hit is None:
            unplaced.append(key)
            continue
        new_key, fn = hit
        out[new_key] = fn(value, conv_mlp=bool(conv_mlp), key=key)
    if unplaced:
        raise CheckpointError(f"the {layout} layout has no place for: {preview(unplaced)}")
    if layout == HF:
        out = {(k if k.startswith("classifier.") else HF_PREFIX + k): v for k, v in out.items()}
    elif layout == OFFICIAL_FCMAE:
        out = {"encoder." + k: v for k, v in out.items()}
    return out


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], src: str | None = None,
                       dst: str = NATIVE, model_config: Mapping | None = None,
                       conv_mlp: bool | None = None) -> dict[str, torch.Tensor]:
    """Convert between any two layouts (through native). ``src=None`` detects it. FCMAE decoder
    keys are dropped; any other key the source layout does not know is an error, so nothing is
    lost silently. ``model_config`` (or ``conv_mlp``) decides timm's 1x1-conv MLP shapes."""
    native, _ignored, unplaced = to_native(state_dict, src)
    if unplaced:
        raise CheckpointError(f"keys that the {src or detect_layout(state_dict)} layout does not "
                              f"know: {preview(unplaced)}")
    if conv_mlp is None and model_config is not None and "dims" in model_config:
        conv_mlp = timm_uses_conv_mlp(model_config["dims"])
    return from_native(native, dst, conv_mlp=conv_mlp)


# ---- architecture from shapes -------------------------------------------------------------

def infer_config(native: Mapping[str, torch.Tensor]) -> dict:
    """Constructor arguments of ``ConvNeXtV2`` read off a native state dict's tensor shapes."""
    if "stem.conv.weight" not in native:
        raise CheckpointError("cannot infer the architecture: the checkpoint has no stem "
                              "convolution (stem.conv.weight in native names)")
    stem = native["stem.conv.weight"]
    depths, dims = [0, 0, 0, 0], [0, 0, 0, 0]
    block_re = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.dwconv\.weight$")
    for key, value in native.items():
        m = block_re.match(key)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            if s > 3:
                raise CheckpointError(f"{key}: ConvNeXt V2 has 4 stages, found stage {s}")
            depths[s] = max(depths[s], b + 1)
            dims[s] = int(value.shape[0])
    if 0 in depths:
        raise CheckpointError(f"cannot infer the architecture: blocks per stage {depths} "
                              "(a stage without blocks)")
    fc = native.get("head.fc.weight")
    return dict(
        in_chans=int(stem.shape[1]), num_classes=int(fc.shape[0]) if fc is not None else 0,
        depths=depths, dims=dims, stem_stride=int(stem.shape[-1]),
        use_grn=any(k.endswith(".grn.gamma") for k in native),
        layer_scale_init_value=1e-6 if any(k.endswith(".layer_scale") for k in native) else None)
