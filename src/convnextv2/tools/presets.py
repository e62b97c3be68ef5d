"""Fine-tuning presets for small images on a short budget, and a held-out split to choose them.

The official fine-tuning recipe (RandAugment, mixup 0.8, cutmix 1.0, random erasing 0.25, EMA
0.9999, RandomResizedCrop down to 8 % of the image) is built for 224 px ImageNet and 100-600
epochs. On 28 px Fashion-MNIST and a few epochs it hides most of the accuracy: the regularisers
need many epochs to pay off, and an EMA with decay 0.9999 averages over ~10,000 steps while the
run has a few hundred. ``SMALL_IMAGE_SHORT`` is the preset chosen by this rule:

1. **Crop**: the official small-image rule (images of 32 px or less): ``RandomCrop(size,
   padding=4)`` and no resize at evaluation, which ``convnextv2.data.train_transform`` /
   ``eval_transform`` apply by themselves at ``img_size <= 32``. Horizontal flip stays.
2. **Regularisation scaled to the budget**: with fewer than ~10 epochs, no RandAugment, mixup,
   cutmix, random erasing, drop path or EMA. Label smoothing 0.1 and weight decay 0.05 (the
   values every official preset except atto uses) stay: they cost nothing in steps.
3. **Schedule**: AdamW, half an epoch of linear warmup, then cosine to 1e-6 (the recipes have
   no one-cycle schedule; warmup + cosine is the closest shape they offer).
4. **Free choices picked on held-out training images, never the test set**: the batch (64 or
   32: twice the optimizer steps in the same epochs) and the peak lr (1e-3 to 8e-3), by the
   from-scratch arm's held-out top-1 after 4 epochs. Tuning for the baseline, not for FCMAE,
   keeps the comparison honest: any FCMAE gain is measured against the best scratch run we
   found. The pretrained arm keeps the official small-model layer decay 0.9.
   ``holdout_split`` sets 2,000 training images aside (FCMAE pretrains on the other 8,000);
   ``studies/demo_preset_sweep.py`` runs such a comparison. The measurements are in the README's
   Demo section: batch 32, lr 2e-3 won (66.5 %, against 64.2 % at 4e-3 and 62.3 % at batch 64).

A network trained from scratch gets ``layer_decay=1.0`` whatever the preset: layer-wise decay is
a device for keeping pretrained lower layers close to their start, meaningless for random ones.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

SMALL_IMAGE_SHORT = dict(
    epochs=4, batch_size=32, lr=2e-3, min_lr=1e-6, warmup_epochs=0.5, weight_decay=0.05,
    layer_decay=0.9, drop_path=0.0, smoothing=0.1, mixup=0.0, cutmix=0.0, reprob=0.0,
    auto_augment="none", model_ema=False,
)

# the candidates studies/demo_preset_sweep.py compares (see the module docstring)
LR_CANDIDATES = (2e-3, 4e-3, 8e-3)
LAYER_DECAY_CANDIDATES = (0.9, 1.0)


def small_image_finetune(pretrained: bool, **overrides) -> dict:
    """``FinetuneConfig`` keyword arguments of the preset for one arm (see module docstring)."""
    values = dict(SMALL_IMAGE_SHORT)
    if not pretrained:
        values["layer_decay"] = 1.0
    values.update(overrides)
    return values


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
