"""Synthetic detection and segmentation scenes from the built-in Fashion-MNIST subset.

Each scene is a ``size`` x ``size`` RGB canvas (a smooth random colour gradient with noise) with
2-6 garments pasted at random scales and positions: the 28x28 gray garment is resized, tinted
with a random colour (its gray levels kept as shading) and alpha-blended in. Placements whose
box overlaps an earlier garment's by more than ``max_overlap`` (IoU) are redrawn, and later
garments occlude earlier ones; instance masks are what stays visible. Everything is a function
of the seed, so two calls write identical files.

The scenes are written in the formats real data comes in, so they go through the same readers:

- ``detection/``: COCO instance JSON (``annotations/instances_{train,val}.json``, masks as RLE)
  and image folders ``train/`` and ``val/``;
- ``segmentation/``: the ADE20K layout, ``images/{training,validation}/*.jpg`` and mask PNGs
  ``annotations/{training,validation}/*.png`` with ADE20K's label convention: 0 is "ignore"
  (here the soft anti-aliased rim of each garment), 1 is the background, 2.. the garment
  classes, so reading with ``reduce_zero_label`` gives background 0, garments 1.., ignore 255.

``label_set="fine"`` keeps Fashion-MNIST's ten classes; ``"coarse"`` groups them by silhouette
into top / trousers / footwear / bag, which the demos use: a few CPU minutes of training are
not enough to tell a shirt from a pullover at 30 px, and the comparison needs a task both runs
can make progress on.

Training scenes use the subset's training garments, validation scenes its test garments.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

DARK_LEVEL = 12   # gray levels below this, reachable from the border, are not garment
CORE = 0.6        # resized silhouette coverage from which a pixel is in the instance mask
RIM = 0.15        # coverage in [RIM, CORE): the soft rim, "ignore" in the semantic map
SPLITS = {"train": "training", "val": "validation"}
# "coarse" classes: garments grouped by silhouette, a task a small network can learn in a few
# CPU minutes; "fine" keeps Fashion-MNIST's ten classes (shirt vs T-shirt vs pullover...)
COARSE = {"top": (0, 2, 3, 4, 6), "trousers": (1,), "footwear": (5, 7, 9), "bag": (8,)}
LABEL_SETS = ("fine", "coarse")


def class_names(label_set: str) -> list[str]:
    from ..data import FASHION_MNIST_CLASSES
    if label_set not in LABEL_SETS:
        raise ValueError(f"label set {label_set!r}: choose one of {', '.join(LABEL_SETS)}")
    return list(FASHION_MNIST_CLASSES) if label_set == "fine" else list(COARSE)


def _class_map(label_set: str) -> np.ndarray:
    """Fashion-MNIST label -> scene class index (0-based)."""
    if label_set == "fine":
        return np.arange(10)
    table = np.zeros(10, np.int64)
    for i, members in enumerate(COARSE.values()):
        table[list(members)] = i
    return table


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    img = a * (1 - t) + b * t
    img = img + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255)


def silhouette(gray: np.ndarray) -> np.ndarray:
    """The garment's filled outline at 28x28: everything except the dark pixels connected to
    the image border (a flood fill by repeated 4-neighbour dilation), so dark prints and
    shadows inside a garment stay part of it."""
    dark = gray < DARK_LEVEL
    outside = np.zeros_like(dark)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = (
        dark[0, :], dark[-1, :], dark[:, 0], dark[:, -1])
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= dark
        if (grown == outside).all():
            return ~outside
        outside = grown


def _box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compose_scene(rng: np.random.Generator, garments: np.ndarray, labels: np.ndarray,
                  size: int = 128, objects: tuple[int, int] = (2, 6),
                  scale: tuple[float, float] = (0.22, 0.5), max_overlap: float = 0.2):
    """One scene: (image uint8 HxWx3, instance id map int32 (0 = none), soft rim mask bool,
    per-instance class labels 0..9)."""
    canvas = _background(rng, size)
    ids = np.zeros((size, size), np.int32)
    rim = np.zeros((size, size), bool)
    boxes, classes = [], []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        for _attempt in range(20):
            s = int(round(rng.uniform(*scale) * size))
            x, y = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            box = (x, y, x + s, y + s)
            if all(_box_iou(box, b) <= max_overlap for b in boxes):
                break
        else:
            continue
        k = int(rng.integers(len(garments)))
        shape = Image.fromarray(silhouette(garments[k]).astype(np.uint8) * 255)
        cover = np.asarray(shape.resize((s, s), Image.BILINEAR), np.float32) / 255.0
        gray = np.asarray(Image.fromarray(garments[k]).resize((s, s), Image.BILINEAR), np.float32)
        colour = rng.uniform(40, 255, 3)
        alpha = cover[..., None]
        texture = colour * (0.35 + 0.65 * gray[..., None] / 255.0)
        region = canvas[y:y + s, x:x + s]
        canvas[y:y + s, x:x + s] = region * (1 - alpha) + texture * alpha
        n = len(boxes) + 1
        core = cover >= CORE
        soft = (cover >= RIM) & ~core
        ids[y:y + s, x:x + s][core] = n
        rim[y:y + s, x:x + s][core] = False
        rim[y:y + s, x:x + s][soft & (ids[y:y + s, x:x + s] == 0)] = True
        boxes.append(box)
        classes.append(int(labels[k]))
    return canvas.astype(np.uint8), ids, rim, classes


def write_synthetic(output: str | Path, n_train: int = 200, n_val: int = 50, size: int = 128,
                    seed: int = 0, objects: tuple[int, int] = (2, 6),
                    min_area: int = 40, label_set: str = "fine",
                    scale: tuple[float, float] = (0.22, 0.5)) -> dict:
    """Write ``n_train`` + ``n_val`` scenes under ``output`` (``detection/``, ``segmentation/``);
    returns the paths. Instances with fewer than ``min_area`` visible pixels are painted into
    the ignore label and left out of the COCO file, so nothing visible goes unlabelled."""
    from pycocotools import mask as mask_utils

    from ..data import build_dataset

    out = Path(output)
    det, seg = out / "detection", out / "segmentation"
    names, to_class = class_names(label_set), _class_map(label_set)
    categories = [dict(id=i + 1, name=n, supercategory="garment") for i, n in enumerate(names)]
    for split, count in (("train", n_train), ("val", n_val)):
        source = build_dataset("builtin", split)
        garments = np.asarray(source.images)
        labels = to_class[np.asarray(source.targets)]
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        img_dir, seg_img, seg_ann = det / split, seg / "images" / SPLITS[split], \
            seg / "annotations" / SPLITS[split]
        for d in (img_dir, seg_img, seg_ann, det / "annotations"):
            d.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, ids, rim, classes = compose_scene(rng, garments, labels, size, objects, scale)
            name = f"scene_{i:05d}.jpg"
            Image.fromarray(image).save(img_dir / name, quality=95)
            shutil.copyfile(img_dir / name, seg_img / name)
            semantic = np.ones((size, size), np.uint8)  # 1 = background
            semantic[rim] = 0
            images.append(dict(id=i + 1, file_name=name, width=size, height=size))
            for n, cls in enumerate(classes, start=1):
                m = ids == n
                if m.sum() < min_area:
                    semantic[m] = 0
                    continue
                semantic[m] = cls + 2
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                rle["counts"] = rle["counts"].decode("ascii")
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1,
                                        category_id=cls + 1, bbox=[x, y, w, h],
                                        area=float(mask_utils.area(rle)), iscrowd=0,
                                        segmentation=rle))
            Image.fromarray(semantic, mode="L").save(seg_ann / name.replace(".jpg", ".png"))
        coco = dict(info=dict(description=f"synthetic Fashion-MNIST scenes, seed {seed}"),
                    images=images, annotations=annotations, categories=categories)
        (det / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    (seg / "classes.txt").write_text("\n".join(["background"] + names) + "\n")
    return dict(detection=det, segmentation=seg)


BUILTIN = dict(n_train=256, n_val=64, size=128, seed=0, label_set="coarse", objects=(2, 4),
               scale=(0.3, 0.55))


def builtin_scenes(cache: str | Path | None = None, **overrides) -> dict:
    """The built-in scene set (``--data builtin``), written once into a cache folder
    (``$XDG_CACHE_HOME/convnextv2`` or ``~/.cache/convnextv2``) and reused: the files are a
    function of the parameters, which name the folder. Written to a temporary folder first
    and renamed, so an interrupted write is never mistaken for a complete set."""
    import os
    import tempfile

    params = dict(BUILTIN, **overrides)
    base = Path(cache or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "convnextv2"
    name = "scenes-{n_train}-{n_val}-{size}px-seed{seed}-{label_set}-{objects[1]}obj".format(**params)
    final = base / name
    if not (final / "complete").is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
        write_synthetic(tmp, **params)
        (tmp / "complete").write_text("")
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return dict(detection=final / "detection", segmentation=final / "segmentation")


def write_unlabelled(folder: str | Path, n: int, size: int = 128, seed: int = 0,
                     objects: tuple[int, int] = (2, 6),
                     scale: tuple[float, float] = (0.22, 0.5)) -> Path:
    """``n`` scenes as plain images (no annotations) from the training garments: the
    unlabelled pool FCMAE pretrains on. A different ``seed`` from the labelled set's gives
    other scenes."""
    from ..data import build_dataset

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = build_dataset("builtin", "train")
    garments, labels = np.asarray(source.images), np.asarray(source.targets)
    rng = np.random.default_rng([seed, 2])
    for i in range(n):
        image, _, _, _ = compose_scene(rng, garments, labels, size, objects, scale)
        Image.fromarray(image).save(folder / f"unlabelled_{i:05d}.jpg", quality=95)
    return folder
