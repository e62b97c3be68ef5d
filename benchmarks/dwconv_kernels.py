"""One sparse depthwise 7x7 layer, forward + backward, per stage: the grid kernel (the library's
dense depthwise conv on the zero-filled map) vs the Triton kernels (visible sites only).

The layer-level view of ``fcmae_speed.py``'s sparse vs sparse-triton: the same sites (224 px,
mask 0.6, 19 of 49 patches visible, Z order), each stage's width of the chosen model, timed
in turns (median of ``--repeats``); on CUDA with CUDA events, bf16 by default. Also prints the
largest difference between the two kernels' outputs and gradients, relative to the largest value.

    python benchmarks/dwconv_kernels.py --model convnextv2_base --batch 64          # CUDA
    python benchmarks/dwconv_kernels.py --model convnextv2_atto --batch 32 --device cpu --dtype fp32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from convnextv2.fcmae.masking import random_mask
from convnextv2.fcmae.sparse import SparseLayout, resolve_dwconv, submanifold_dwconv
from convnextv2.models.variants import VARIANTS, resolve_name

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnextv2_base")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; use --device cpu (grid kernel only)")
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    dims = VARIANTS[resolve_name(args.model)]["dims"]
    grid = (args.img_size // 32,) * 2
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(args.batch, grid, args.mask_ratio, generator=gen).to(dev)
    layout = SparseLayout.from_mask(mask, grid, num_visible=int(grid[0] * grid[1] * (1 - args.mask_ratio)))
    kernels = ["grid"] + (["triton"] if resolve_dwconv("triton", mask) == "triton" else [])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"{args.model}, batch {args.batch}, {args.img_size} px, {args.dtype}, "
          f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}, kernels {kernels}")
    for stage, c in enumerate(dims):
        index, hw = layout.flat_index[stage], layout.stage_hw[stage]
        conv = torch.nn.Conv2d(c, c, 7, padding=3, groups=c).to(dev, dtype)
        x = torch.randn(args.batch, index.numel() // args.batch, c, device=dev, dtype=dtype,
                        requires_grad=True)
        g = torch.randn_like(x)
        neighbours = None
        if "triton" in kernels:
            from convnextv2.fcmae.triton_dwconv import neighbour_table
            neighbours = neighbour_table(index, args.batch, *hw, 7)

        def run(kernel):
            y = submanifold_dwconv(conv, x, index, hw, kernel, neighbours)
            return [y, *torch.autograd.grad(y, [x, conv.weight, conv.bias], g)]

        outs = {k: run(k) for k in kernels}  # warm-up (Triton compiles here) and the results
        times = {k: [] for k in kernels}
        for _ in range(args.repeats):
            for k in kernels:
                sync()
                t0 = time.perf_counter()
                run(k)
                sync()
                times[k].append(time.perf_counter() - t0)
        line = f"  stage {stage}: C={c:4d} {hw[0]}x{hw[1]}, {index.numel()} sites: " + ", ".join(
            f"{k} {statistics.median(v) * 1e6:8.0f} us" for k, v in times.items())
        if "triton" in outs:
            speedup = statistics.median(times["grid"]) / statistics.median(times["triton"])
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                      for a, b in zip(outs["triton"], outs["grid"]))
            line += f"  (triton {speedup:.2f}x; largest difference {err:.1e} of the values)"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
