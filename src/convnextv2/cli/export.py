from __future__ import annotations

HELP = "Export a classifier to ONNX or TorchScript (checked against PyTorch, dynamic batch)."
EPILOG = """examples:
  convnextv2 export --checkpoint runs/ft/best.safetensors --format onnx model.onnx
  convnextv2 export --checkpoint atto.safetensors --format torchscript --img-size 224 model.pt

The export is run on two batch sizes right after writing and must match PyTorch within
--atol (default 1e-4, times the largest logit when that exceeds 1); ONNX is checked through
onnxruntime. The file is written under a temporary name and renamed into place only when the
check passes, so a failed export leaves an existing OUT as it was. An existing OUT is never
replaced without --overwrite."""


def add_arguments(p):
    from ..tools.export import FORMATS
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--key", help="entry of a training checkpoint to use: model_ema (official "
                                 "files), ema (finetune's checkpoint-*.pt run states)")
    p.add_argument("--model", help="variant name (optional; checked against the checkpoint)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("out", metavar="OUT", help="file to write")
    p.add_argument("--img-size", type=int, help="default: the checkpoint's, else 224")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (only once the new export has passed its "
                        "check)")


def run(args) -> int:
    from ..recipes.evaluate import load_classifier
    from ..tools.export import export_model

    from ._guard import check_img_size, require_classifier, writable_file

    if args.format == "onnx" and not 7 <= args.opset <= 20:
        raise ValueError(f"--opset {args.opset}: the ONNX exporter writes opsets 7 to 20 "
                         f"(default 17)")
    out = writable_file(args.out, "OUT", "model.onnx" if args.format == "onnx" else "model.pt")
    if out.exists() and not args.overwrite:
        raise ValueError(f"OUT {out} already exists; pass --overwrite to replace it, or give "
                         f"a new file name")
    if not args.atol > 0:
        raise ValueError(f"--atol must be a positive tolerance, got {args.atol}")
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be a positive number of pixels, got {args.img_size}")
    model, info = load_classifier(args.checkpoint, args.model, key=args.key)
    require_classifier(model, args.checkpoint)
    img_size = int(args.img_size or info.get("img_size") or 224)
    check_img_size(img_size, model.config)
    try:
        rep = export_model(model, args.out, args.format, img_size=img_size, atol=args.atol,
                           opset=args.opset)
    except RuntimeError as e:  # the check failed, or onnx/onnxruntime is missing
        raise ValueError(f"export to {args.out} failed (an existing file is left as it was): "
                         f"{' '.join(str(e).split())}") from None
    diffs = ", ".join(f"batch {b}: {d:.2e}" for b, d in rep["max_abs_diff"].items())
    print(f"wrote {args.out} ({args.format}, input N x {rep['in_chans']} x {img_size} x "
          f"{img_size}, dynamic batch); max |diff| vs PyTorch: {diffs}")
    return 0
