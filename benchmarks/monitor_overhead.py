"""What the pretraining monitor costs next to the epoch it follows, in the demo's setting.

Runs the classification demo's FCMAE pretraining (its model, data and batch) for ``--epochs``
epochs with ``--monitor-data builtin``, then prints each probe's time (k-NN over
``--monitor-images`` bank and query images, collapse over 64) and the measured fraction of the
epoch before it, beside the load average (a shared machine's timings move with it).

    PYTHONPATH=src python benchmarks/monitor_overhead.py --epochs 1 --monitor-images 500
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--monitor-images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from convnextv2.demos.classification import DemoConfig, pretrain_kwargs
    from convnextv2.recipes.pretrain import PretrainConfig, pretrain
    from convnextv2.training.metrics import read_metrics

    torch.set_num_threads(args.threads)
    demo = DemoConfig(pretrain_epochs=args.epochs, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        pretrain(PretrainConfig(**pretrain_kwargs(demo, "builtin", str(out)),
                                monitor_data="builtin", monitor_every=1,
                                monitor_images=args.monitor_images))
        total = time.perf_counter() - start
        probes = [r for r in read_metrics(out / "metrics.jsonl") if "knn_top1" in r]
    print(f"demo pretraining, {args.epochs} epoch(s), {args.threads} thread(s): {total:.1f} s "
          f"in all; load average {os.getloadavg()}")
    for p in probes:
        share = (f", {100 * p['monitor_fraction']:.1f}% of the epoch before it"
                 if "monitor_fraction" in p else " (before training)")
        print(f"  probe at epoch {p['epoch']}: {p['monitor_s']:.1f} s{share}; k-NN top-1 "
              f"{p['knn_top1']:.1f}% on {p['knn_queries']} queries, collapse mean "
              f"{p['collapse_mean']:.3f}")


if __name__ == "__main__":
    main()
