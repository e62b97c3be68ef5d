"""Every checkpoint the ConvNeXt V2 paper released, by the names timm users already know.

A catalogue name is ``<variant>.<tag>`` (``convnextv2_tiny.fcmae_ft_in22k_in1k_384``). Each
entry says where the weights live (the timm Hub repo, the Hugging Face transformers repo where
one exists, and the official URL that both were made from), how images must be prepared for
it (input size, crop_pct and crop mode, mean/std) and the paper's ImageNet-1K top-1.

The released set is regular, so it is written as rules rather than 26 hand-typed rows: every
size has its FCMAE encoder and its IN-1K fine-tuned classifier; nano to large also have the
IN-22K intermediate fine-tuned classifiers at 224 and 384 px; huge has them at 384 and 512 px.
The table is plain data: reading it needs neither torch nor the network.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

OFFICIAL_ROOT = "https://dl.fbaipublicfiles.com/convnext/convnextv2/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LICENSE = "cc-by-nc-4.0"  # the official weights' licence (the code is MIT)

SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
SMALL_SIZES = ("atto", "femto", "pico")  # released with FCMAE and IN-1K fine-tuned weights only

# the paper's ImageNet-1K top-1 (%), FCMAE pretraining then IN-1K fine-tuning at 224 px
TOP1_IN1K = dict(atto=76.7, femto=78.5, pico=80.3, nano=81.9, tiny=83.0, base=84.9, large=85.8,
                 huge=86.3)
# ... with IN-22K intermediate fine-tuning, by input size
TOP1_IN22K = dict(nano={224: 82.1, 384: 83.4}, tiny={224: 83.9, 384: 85.1},
                  base={224: 86.8, 384: 87.7}, large={224: 87.3, 384: 88.2},
                  huge={384: 88.7, 512: 88.9})


@dataclass(frozen=True)
class PretrainedEntry:
    """One released checkpoint and how to use it.

    ``crop_pct`` with ``crop_mode='center'``: resize the short side to size / crop_pct, then
    centre-crop; ``crop_mode='squash'`` (the 384/512 px models, crop_pct 1): resize the whole
    image to size x size. ``top1`` is None for FCMAE encoders, which have no classifier."""

    name: str
    variant: str
    tag: str
    url: str
    hub_id: str
    hf_id: str | None
    input_size: int
    crop_pct: float
    crop_mode: str
    num_classes: int
    top1: float | None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bicubic"
    license: str = LICENSE

    @property
    def filename(self) -> str:
        """The official file's name (``convnextv2_tiny_22k_384_ema.pt``)."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def encoder_only(self) -> bool:
        return self.num_classes == 0


def _entry(size: str, tag: str, folder: str, data: str, px: int, kind: str,
           hf: bool, top1: float | None) -> PretrainedEntry:
    variant = f"convnextv2_{size}"
    name = f"{variant}.{tag}"
    fcmae = kind == "fcmae"
    return PretrainedEntry(
        name=name, variant=variant, tag=tag,
        url=f"{OFFICIAL_ROOT}{folder}/{variant}_{data}_{px}_{kind}.pt",
        hub_id=f"timm/{name}",
        hf_id=f"facebook/convnextv2-{size}-{data}-{px}" if hf else None,
        input_size=px, crop_pct=0.875 if px == 224 else 1.0,
        crop_mode="center" if px == 224 else "squash",
        num_classes=0 if fcmae else 1000, top1=top1)


def _build() -> dict[str, PretrainedEntry]:
    entries = []
    for size in SIZES:
        # FCMAE encoders (no head; not on the HF transformers Hub)
        entries.append(_entry(size, "fcmae", "pt_only", "1k", 224, "fcmae", False, None))
        entries.append(_entry(size, "fcmae_ft_in1k", "im1k", "1k", 224, "ema", True,
                              TOP1_IN1K[size]))
        for px, top1 in TOP1_IN22K.get(size, {}).items():
            tag = "fcmae_ft_in22k_in1k" + ("" if px == 224 else f"_{px}")
            entries.append(_entry(size, tag, "im22k", "22k", px, "ema", True, top1))
    return {e.name: e for e in entries}


CATALOG: dict[str, PretrainedEntry] = _build()


def list_pretrained(pattern: str = "*") -> list[str]:
    """Catalogue names matching a shell-style ``pattern`` (``*tiny*``, ``*_384``), sorted as
    released (size, then tag). A pattern without a wildcard matches as a substring."""
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return [name for name in CATALOG if fnmatch.fnmatchcase(name, pattern.lower())]


def default_tag(variant: str) -> str:
    """The tag ``pretrained=True`` picks for a bare variant name: the first IN-22K fine-tuned
    classifier where there is one (the most accurate at its size), else the IN-1K one; the
    same choice timm makes, so a name means the same weights in both."""
    tags = [e.tag for e in CATALOG.values() if e.variant == variant]
    return next((t for t in tags if "in22k" in t), "fcmae_ft_in1k")


def tags_of(variant: str) -> list[str]:
    return [e.tag for e in CATALOG.values() if e.variant == variant]


def lookup(variant: str, tag: str | None) -> PretrainedEntry:
    """The entry for ``variant`` (a resolved variant name) and ``tag`` (None: the default);
    a tag that was not released is a ValueError naming the ones that were."""
    tag = default_tag(variant) if tag in (None, "", True) else str(tag)
    entry = CATALOG.get(f"{variant}.{tag}")
    if entry is None:
        raise ValueError(f"{variant} has no released weights tagged {tag!r}; released: "
                         f"{', '.join(tags_of(variant))} (see convnextv2 info --pretrained)")
    return entry
