"""What an FCMAE training forward keeps for backward, sparse backend vs masked dense.

Peak memory mixes three things: the training state (weights, gradients, optimizer moments; the
same for both backends), the tensors autograd keeps from the forward for the backward (what
the sparse backend should shrink to the visible fraction), and short-lived buffers. This counts
the second one exactly, on any device: every tensor saved for backward passes through a
``torch.autograd.graph.saved_tensors_hooks`` pack hook, and each distinct storage is counted
once (parameters and their autocast copies are listed apart: they do not grow with the batch).

Two batch sizes give the per-sample slope, which is what decides the ratio at large batches:

    python benchmarks/saved_activations.py --model convnextv2_base --batch 4 8 --amp bf16
    python benchmarks/saved_activations.py --model convnextv2_atto --batch 16 32 --compile

``--compile`` compiles per block (``compiled_regions.compile_regions``, inductor), the mode the GPU
benchmarks run in: the compiler, not the code, then decides what is kept. ``--top`` lists the
largest kept shapes of the larger batch.
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch

from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masking import random_mask

from compiled_regions import compile_regions


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--batch", type=int, nargs=2, default=[16, 32], metavar=("SMALL", "LARGE"))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--compile", action="store_true", help="compile per block (inductor) first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=0, help="list the N largest kept shapes")
    args = p.parse_args(argv)
    if not 0 < args.batch[0] < args.batch[1]:
        p.error(f"--batch needs two sizes, the first smaller, got {args.batch}")
    return args


def saved_for_backward(model: FCMAE, imgs, mask, amp: str):
    """(bytes kept that grow with the batch, bytes of weight copies, Counter of (dtype, shape))."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_shapes = set()  # a weight as stored, flattened to 2-d (1x1 convs) or transposed
    for p in model.parameters():
        flat = (p.shape[0], p.numel() // max(p.shape[0], 1)) if p.dim() else ()
        param_shapes |= {tuple(p.shape), flat, flat[::-1]}
    seen: dict[int, int] = {}
    weights = 0
    shapes: collections.Counter = collections.Counter()

    def pack(t):
        nonlocal weights
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in params or key in seen or storage.nbytes() == 0:
            return t
        is_weight = tuple(t.shape) in param_shapes  # a cast (autocast) or reshaped weight
        seen[key] = 0 if is_weight else storage.nbytes()
        if is_weight:
            weights += storage.nbytes()
        else:
            shapes[(str(t.dtype).replace("torch.", ""), tuple(t.shape))] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model(imgs, mask)[0]
    loss.backward()
    return sum(seen.values()), weights, shapes


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    proto = FCMAE(args.model, mask_ratio=args.mask_ratio)
    rows = {}
    for backend in ("sparse", "dense"):
        model = FCMAE(args.model, mask_ratio=args.mask_ratio, backend=backend)
        model.load_state_dict(proto.state_dict())
        model.to(device).train()
        if args.compile:
            compile_regions(model)
        kept = []
        for batch in args.batch:
            imgs = torch.randn(batch, model.in_chans, args.img_size, args.img_size, device=device)
            mask = random_mask(batch, model.grid_size(imgs), args.mask_ratio,
                               generator=torch.Generator().manual_seed(1)).to(device)
            if args.compile:  # compile (and warm up) outside the count
                saved_for_backward(model, imgs, mask, args.amp)
            kept.append(saved_for_backward(model, imgs, mask, args.amp))
        rows[backend] = kept
        small, large = kept
        per_sample = (large[0] - small[0]) / (args.batch[1] - args.batch[0])
        print(f"{'sparse' if backend == 'sparse' else 'masked-dense':12s} kept for backward: "
              f"batch {args.batch[0]} {small[0] / 2**20:8.1f} MiB, batch {args.batch[1]} "
              f"{large[0] / 2**20:8.1f} MiB; per sample {per_sample / 2**20:6.2f} MiB; "
              f"weight copies {large[1] / 2**20:.1f} MiB", flush=True)
        if args.top:
            for (dtype, shape), nbytes in large[2].most_common(args.top):
                print(f"    {nbytes / 2**20:8.2f} MiB  {dtype:9s} {shape}")
    slope = {b: (r[1][0] - r[0][0]) / (args.batch[1] - args.batch[0]) for b, r in rows.items()}
    print(f"per sample, sparse / masked-dense: {slope['sparse'] / slope['dense']:.3f} "
          f"({args.model}, {args.img_size} px, mask ratio {args.mask_ratio}, {args.amp}, "
          f"{'compiled per block' if args.compile else 'eager'}, {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
