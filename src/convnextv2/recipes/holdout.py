"""A held-out split of a training set, to choose recipe values without touching the test set.

The demos' small-image preset (``recipes.presets.SMALL_IMAGE_SHORT``) was chosen on such a
split: studies/demo_preset_sweep.py fine-tunes on the rest of the training images and scores
on the held-out ones.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def holdout_split(source: str, folder: str | Path, holdout: int, seed: int = 0) -> Path:
    """Write an IDX folder whose ``train`` split is the training images of ``source`` minus
    ``holdout`` of them, chosen with ``seed``, and whose ``test`` split is those held-out
    *training* images. Fine-tuning on it validates on data the final test set never sees.

    Name the folder with "fashion" in it to keep Fashion-MNIST's class names (the IDX reader
    goes by the path). A folder already holding the same split (same fingerprint) is reused.
    """
    import numpy as np

    from ..data import build_dataset, write_idx

    ds = build_dataset(source, "train")
    images, labels = np.asarray(ds.images), np.asarray(ds.targets, dtype=np.uint8)
    if not 0 < holdout < len(images):
        raise ValueError(f"holdout must be between 1 and {len(images) - 1}, got {holdout}")
    order = np.random.default_rng(seed).permutation(len(images))
    val, train = np.sort(order[:holdout]), np.sort(order[holdout:])
    digest = hashlib.sha1(images[val[:64]].tobytes() + bytes(str((holdout, seed, len(images))),
                                                             "ascii")).hexdigest()[:10]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "fingerprint.txt"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    write_idx(out / "train-images-idx3-ubyte", images[train])
    write_idx(out / "train-labels-idx1-ubyte", labels[train])
    write_idx(out / "t10k-images-idx3-ubyte", images[val])
    write_idx(out / "t10k-labels-idx1-ubyte", labels[val])
    stamp.write_text(digest + "\n")
    return out
