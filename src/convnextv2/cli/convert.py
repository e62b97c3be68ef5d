"""``convnextv2 convert``: rewrite a checkpoint in another layout."""
from __future__ import annotations

HELP = "Convert a checkpoint between the native, timm, HF transformers and official layouts."
EPILOG = """examples:
  convnextv2 convert convnextv2_atto_1k_224_ema.pt atto.safetensors            # official -> native
  convnextv2 convert fcmae_pretrain.pt encoder.safetensors --to timm --model atto
  convnextv2 convert atto.safetensors hf_atto/ --to hf                         # a folder
  convnextv2 convert hf_atto/ atto_official.pt --to official
  convnextv2 convert convnextv2_tiny.fcmae_ft_in1k tiny_hf/ --to hf            # a released name
Input layouts are detected: native, official dense, official FCMAE (MinkowskiEngine names,
decoder dropped), timm, HF transformers. Without --model the architecture is read off the
tensor shapes (native files store it). An existing OUTPUT is never replaced without --overwrite.
Pickled inputs are read without running code from them; for a trusted file that needs more
(a pickled class), --trust-pickle converts it once into a safetensors file that never will."""

TARGETS = ("native", "timm", "hf", "official")


def add_arguments(p):
    p.add_argument("input", help="checkpoint file (.pt .pth .bin .safetensors), HF folder or "
                                 "released name (convnextv2 info --pretrained)")
    p.add_argument("output", help="file to write (a folder for --to hf)")
    p.add_argument("--to", default="native", choices=TARGETS, help="output layout (default native)")
    p.add_argument("--model", help="variant the checkpoint must match (default: inferred)")
    p.add_argument("--key", help="entry of a training checkpoint holding the weights "
                                 "(default: model, else model_ema, else state_dict)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT if it exists (default: refuse)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle INPUT without the weights-only guard; it can run code from "
                        "the file, so only for a file you trust")


def _describe(config: dict) -> str:
    from ..models.variants import variant_of
    name = variant_of(config) or "custom"
    return (f"{name}: depths {list(config['depths'])}, dims {list(config['dims'])}, "
            f"{config['num_classes']} classes, {config['in_chans']} input channels")


def run(args) -> int:
    import torch

    from ..checkpoint import load_state, save_checkpoint
    from ..checkpoint.io import read_state_dict
    from ..checkpoint.loading import _config_of, _materialise
    from ..models.model import ConvNeXtV2

    from pathlib import Path

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        kind = "folder" if out.is_dir() else "file"
        raise ValueError(f"output {out} exists (a {kind}); pass --overwrite to replace it, or "
                         f"pick another name")
    if out.exists() and Path(args.input).exists() and out.resolve() == Path(args.input).resolve():
        raise ValueError(f"output {out} is the input file; write the conversion elsewhere")
    if out.is_dir() and args.to != "hf":
        raise ValueError(f"output {out} is a folder; --to {args.to} writes a file")
    from ..checkpoint import resolve_checkpoint

    state_dict, metadata, source = read_state_dict(resolve_checkpoint(args.input), args.key,
                                                   trust_pickle=args.trust_pickle)
    config = _config_of(state_dict, metadata)
    if args.model:
        from ..models.variants import model_config
        config = model_config(args.model, num_classes=config["num_classes"],
                              in_chans=config["in_chans"], stem_stride=config["stem_stride"])
    with torch.device("meta"):
        model = ConvNeXtV2(**config)
    report = load_state(model, state_dict, strict=True, drop_head=None, source=source,
                        metadata=metadata)
    _materialise(model)
    ignored = f", ignored {len(report['ignored'])} FCMAE decoder keys" if report["ignored"] else ""
    head = "" if report["head"] == "loaded" else "; no classifier head (encoder only)"
    print(f"read {source}: {report['layout']} layout, {report['loaded']} tensors{ignored}{head}")
    extra = {k: v for k, v in metadata.items() if k not in ("format", "config")}
    out = save_checkpoint(model, args.output, layout=args.to, metadata=extra)
    print(f"wrote {out}: {args.to} layout ({_describe(model.config)})")
    return 0
