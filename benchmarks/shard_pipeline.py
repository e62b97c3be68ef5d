"""Tar shards against an ImageFolder: pretraining loader img/s, 0 and 2 workers.

Both loaders are built exactly as ``pretrain`` builds them (``recipes.pretrain.build_loader``:
decode, RandomResizedCrop, flip, normalise, keyed RNGs); the only difference is ``--data``:
the JPEG folder, or the shards ``convnextv2 shards`` wrote from it. Rates are whole epochs
through a fresh loader iterator (worker start-up included, as in training), images / seconds,
interleaved over --rounds so load drift hits both alike; the median is printed with the
load average. Files come from the page cache (just written), so this measures the CPU cost
of the two readers, not the network-storage effect that is the reason for shards (one open
and one sequential read per ~100 MB instead of per image).

    python benchmarks/shard_pipeline.py                    # 512 JPEGs 500x375, workers 0 2
    python benchmarks/shard_pipeline.py --data /imagenet/train --images 0 --workers 0 4 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from convnextv2.tools.shard_writer import write_shards
from convnextv2.recipes.pretrain import PretrainConfig, build_loader
from convnextv2.training import DistInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import make_jpegs  # noqa: E402  (the same synthetic ImageNet-like JPEGs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="ImageFolder to read (default: make JPEGs in a temp folder)")
    p.add_argument("--images", type=int, default=512, help="JPEGs to make (default 512)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard (default 64)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--rounds", type=int, default=2, help="interleaved measurements (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    return p.parse_args(argv)


def epoch_rate(data: str, workers: int, args, epoch: int) -> float:
    """Images / second of one epoch of the pretraining loader over ``data``."""
    cfg = PretrainConfig(data=data, img_size=args.img_size, batch_size=args.batch,
                         workers=workers, in_chans=3)
    _, loader = build_loader(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    loader.sampler.set_epoch(epoch)
    dataset = loader.dataset
    while not hasattr(dataset, "set_epoch"):
        dataset = dataset.dataset
    dataset.set_epoch(epoch)
    n, start = 0, time.perf_counter()
    for _, batch in zip(range(len(loader)), loader):
        n += len(batch[2])
    return n / (time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="shard_pipeline_"))
    folder = Path(args.data) if args.data else make_jpegs(tmp / "jpegs", args.images, 500, 375,
                                                         90)
    start = time.perf_counter()
    index = write_shards(str(folder), tmp / "shards", args.shard_size, progress=False)["."]
    write_rate = index["samples"] / (time.perf_counter() - start)
    shards = str(tmp / "shards")
    print(f"{index['samples']} images -> {len(index['shards'])} shards of {args.shard_size}: "
          f"written at {write_rate:.0f} img/s; batch {args.batch}, {args.img_size} px, main "
          f"process {args.threads} thread(s); load {os.getloadavg()}")
    rates = {(name, w): [] for w in args.workers for name in ("ImageFolder", "shards")}
    for r in range(args.rounds):
        for w in args.workers:
            for name, data in (("ImageFolder", str(folder)), ("shards", shards)):
                rates[(name, w)].append(epoch_rate(data, w, args, r))
    print("| reader | workers | img/s (median) | runs |")
    print("|---|---:|---:|---|")
    for (name, w), values in rates.items():
        print(f"| {name} | {w} | {statistics.median(values):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in values)} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
