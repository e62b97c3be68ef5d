"""Pretraining input pipeline speed: can JPEG decoding feed the FCMAE training step?

A training step is only as fast as the images arriving for it. This measures, on a folder of
ImageNet-sized JPEGs (made here unless --data is given: 500x375, quality 90, class folders),

  (a) the CPU path, the pretraining loader exactly as ``pretrain`` builds it (``build_loader``
      with ``--decode cpu``): decode, RandomResizedCrop, flip and normalise in DataLoader
      workers, for each --workers count;
  (b) the device path (``--decode device``): workers read file bytes and draw the crops, the
      main process decodes and augments the batch on --device (``DeviceDecoder``); timed
      whole, and its two halves apart (workers alone; decoder alone on collected batches).

Each rate is whole epochs through a fresh loader iterator (worker start-up included, as in
training, whose workers are not persistent), images / seconds. Per core: the CPU path with 0
workers runs in one process on one thread (--threads), i.e. one core's decode rate; with N
workers (one thread each) the rate over N; the best of these is taken. It then prints, for
each training-step rate (--step-rates; default the H100 bf16 rates of benchmarks/
fcmae_speed.py), how many such cores it takes to feed the step.

    python benchmarks/data_pipeline.py                      # CPU: workers 0 1 2, device cpu
    python benchmarks/data_pipeline.py --device cuda --workers 0 4 8 --data /imagenet/train
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convnextv2.data.device_decode import DeviceDecoder
from convnextv2.recipes.pretrain import PretrainConfig, build_loader
from convnextv2.training import DistInfo

STEP_RATES = "base-b64:2521,large-b32:1346,atto-b256:16655"  # H100, bf16, 224 px, compiled


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="image folder to read (default: make JPEGs in a temp folder)")
    p.add_argument("--images", type=int, default=256, help="JPEGs to make (default 256)")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cpu", help="where the device path decodes (cpu, cuda)")
    p.add_argument("--epochs", type=int, default=2, help="passes timed per measurement")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the main process (default 1: one core)")
    p.add_argument("--step-rates", default=STEP_RATES,
                   help=f"name:img/s,... training-step rates to feed (default {STEP_RATES})")
    args = p.parse_args(argv)
    try:
        args.step_rates = [(name, float(rate)) for name, rate in
                           (item.split(":") for item in args.step_rates.split(","))]
    except ValueError:
        p.error(f"--step-rates must be name:img/s,..., got {args.step_rates!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if min(args.workers) < 0 or args.images < args.batch:
        p.error("--workers must be >= 0 and --images at least one --batch")
    if args.data and not Path(args.data).is_dir():
        p.error(f"--data {args.data}: not a folder (give an image folder or leave it out)")
    return args


def make_jpegs(folder: Path, n: int, width: int, height: int, quality: int) -> Path:
    """``n`` photo-like JPEGs (smooth colour fields plus sensor-like noise, so they compress to
    ImageNet-like sizes, about 100 kB at 500x375 q90) in 4 class folders."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        f = rng.uniform(8, 40, 6)
        fields = [128 + 100 * np.sin(x / f[c] + i) * np.cos(y / f[c + 3] - c) for c in range(3)]
        pixels = np.stack(fields, -1) + rng.normal(0, 20, (height, width, 3))
        sub = folder / f"class{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            sub / f"{i:05d}.jpg", quality=quality)
    return folder


def time_loader(loader, epochs: int, step=None, sync=lambda: None) -> float:
    """Images per second over ``epochs`` whole passes (``step(batch)`` applied to each)."""
    n, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)  # the KeyedAugmentDataset, forwarded
        for batch in loader:
            if step is not None:
                step(batch[0])
            n += len(batch[2])  # the sample indices
        sync()
    return n / (time.perf_counter() - start)


def time_decoder(loader, decoder, epochs: int, sync) -> float:
    """The device half alone: batches collected first, then only ``decoder`` timed."""
    batches = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        batches += [b[0] for b in loader]
    decoder(batches[0])  # warm-up (CUDA: nvJPEG handles, kernels)
    sync()
    start = time.perf_counter()
    for b in batches:
        decoder(b)
    sync()
    return sum(len(b.data) for b in batches) / (time.perf_counter() - start)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(make_jpegs(Path(tmp), args.images, args.width, args.height,
                                           args.quality))
        files = sorted(p for p in Path(data).rglob("*.jp*g"))
        size_kb = np.mean([p.stat().st_size for p in files]) / 1e3 if files else float("nan")
        print(f"data: {data} ({len(files)} JPEGs, mean {size_kb:.0f} kB); batch {args.batch}, "
              f"{args.img_size} px, {args.epochs} epochs per rate; main process {args.threads} "
              f"thread(s); device path on {device}; torch {torch.__version__}")

        def loader(decode, workers):
            cfg = PretrainConfig(data=data, batch_size=args.batch, img_size=args.img_size,
                                 workers=workers, decode=decode)
            return build_loader(cfg, DistInfo(device=device))[1]

        print("\n(a) CPU path: decode + augment in workers (pretrain --decode cpu)")
        cpu = {}
        for w in args.workers:
            cpu[w] = time_loader(loader("cpu", w), args.epochs)
            print(f"  workers {w}: {cpu[w]:8.1f} img/s  ({cpu[w] / max(w, 1):7.1f} per "
                  f"{'process' if w else 'core, main process'})")

        print(f"\n(b) device path (pretrain --decode device) on {device}")
        decoder = DeviceDecoder(args.img_size, device)
        read = time_loader(loader("device", 0), args.epochs)
        print(f"  workers' part alone (read bytes, header, draw crop), 1 process: "
              f"{read:8.1f} img/s")
        dec = time_decoder(loader("device", 0), decoder, args.epochs, sync)
        print(f"  decoder alone (decode + crop/resize + flip + normalise on {device}): "
              f"{dec:8.1f} img/s")
        for w in args.workers:
            rate = time_loader(loader("device", w), args.epochs, decoder, sync)
            print(f"  whole, workers {w}: {rate:8.1f} img/s")

        core = max(r / max(w, 1) for w, r in cpu.items())  # the best case for the CPU path
        print(f"\nCPU decode workers needed to feed a training step (one core decodes "
              f"{core:.1f} img/s: the best per-process rate of (a)):")
        for name, rate in args.step_rates:
            print(f"  {name:>12} {rate:8.0f} img/s: {rate:.0f} / {core:.1f} = {rate / core:6.1f}"
                  f" -> {math.ceil(rate / core)} cores")
        print(f"with --decode device the workers only read and draw ({read:.0f} img/s per "
              f"core): {', '.join(f'{n} {math.ceil(r / read)}' for n, r in args.step_rates)} "
              f"core(s); the decode itself runs at {dec:.0f} img/s on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
