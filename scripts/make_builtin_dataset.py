#!/usr/bin/env python
"""Rebuild the packaged Fashion-MNIST subset in src/convnextv2/data/builtin/.

Takes a class-balanced random subset (1000 images per class from the training set, 200 per
class from the test set; seed 0) of the IDX files installed by
``apt-get install dataset-fashion-mnist`` and writes them back as gzipped IDX files with a
fixed gzip timestamp, so running it again gives byte-identical files.

    python scripts/make_builtin_dataset.py [--source /usr/share/datasets/fashion-mnist]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from convnextv2.data.idx import find_idx_pair, read_idx, write_idx  # noqa: E402

OUT = ROOT / "src" / "convnextv2" / "data" / "builtin"


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random samples of every class, in ascending order."""
    chosen = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise SystemExit(f"class {c} has only {len(pool)} samples, need {per_class}")
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(OUT))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for split, prefix, per_class in (("train", "train", args.train_per_class),
                                     ("test", "t10k", args.test_per_class)):
        img_path, lbl_path = find_idx_pair(Path(args.source), split)
        images, labels = read_idx(img_path), read_idx(lbl_path)
        keep = balanced_subset(labels, per_class, rng)
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
        print(f"{split}: {len(keep)} of {len(labels)} images -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
