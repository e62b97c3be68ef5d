"""The named ConvNeXt V2 variants (atto to huge) and their constructor arguments: plain data,
importable by the checkpoint readers without pulling in ``create_model``."""
from __future__ import annotations

# The ConvNeXt V1 block, for the GRN ablations: no GRN, layer scale initialised at 1e-6.
V1_BLOCK = dict(use_grn=False, layer_scale_init_value=1e-6)


def block_kwargs(v1_block: bool) -> dict:
    """Constructor overrides for the block type (empty for the default V2 block)."""
    return dict(V1_BLOCK) if v1_block else {}


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


def variant_of(config: dict) -> str | None:
    """The name of the variant whose depths and widths ``config`` has (None: a custom shape)."""
    return next((name for name, v in VARIANTS.items()
                 if list(v["depths"]) == list(config["depths"])
                 and list(v["dims"]) == list(config["dims"])), None)
