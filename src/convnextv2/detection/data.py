"""COCO-format instance data (a JSON file plus an image folder), read with pycocotools.

The file is checked when the dataset is opened (``check_coco``), so a bad file fails before
training starts with a message naming the file and the key, image or annotation at fault. An
image whose real size differs from the JSON's ``width``/``height`` is reported when it is first
loaded; images are opened through ``data.image_limits`` (a header-checked size limit).

Category ids (COCO's run 1..90 with gaps) map to contiguous labels 1..K in id order; label 0
is torchvision's background. Crowd regions (``iscrowd: 1``) are not training targets (Mask
R-CNN has no crowd handling) but stay in the ground truth COCOeval scores against.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..data.image_limits import ImageTooLargeError, max_image_pixels, open_image
from ..transfer.errors import DataError


COCO_KEYS = ("images", "annotations", "categories")
BOX_SLACK = 1.0  # px a box may stick out of its image (rounding in hand-made files)


def load_coco(ann_file: str | Path, masks: bool = True):
    """A pycocotools ``COCO`` for ``ann_file``, after ``check_coco`` has checked the file's
    structure (pycocotools itself fails on a malformed file with a bare ``KeyError`` or
    ``TypeError`` deep inside, or silently drops what it cannot index)."""
    import json

    from pycocotools.coco import COCO

    path = Path(ann_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist (give a COCO instances "
                                f"JSON such as annotations/instances_val2017.json)")
    try:
        dataset = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a JSON file ({e})") from None
    check_coco(dataset, path.name, masks)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def check_coco(dataset, source: str, masks: bool = True) -> None:
    """Raise ``DataError``, naming ``source`` and the key or record at fault, for a COCO
    instances file that cannot be read as one: a top level that is not an object; no
    ``images`` / ``annotations`` / ``categories`` list; no category; an image without an id,
    a file name or a positive width and height; a file name that is absolute or climbs out of
    the image folder (``../x.png``); two images with one id; an annotation of an unknown
    image; and each annotation's own checks (``check_annotation``)."""
    from pathlib import PurePosixPath, PureWindowsPath

    if not isinstance(dataset, dict):
        raise DataError(f"{source}: the top level is a {type(dataset).__name__}, not a COCO "
                        f"instances object with {', '.join(map(repr, COCO_KEYS))}")
    for key in COCO_KEYS:
        if key not in dataset:
            raise DataError(f"{source}: no {key!r} key (a COCO instances file has "
                            f"{', '.join(map(repr, COCO_KEYS))})")
        if not isinstance(dataset[key], list):
            raise DataError(f"{source}: {key!r} is a {type(dataset[key]).__name__}, not a list")
    if not dataset["categories"]:
        raise DataError(f"{source}: 'categories' is empty; list the object classes, e.g. "
                        f"{{\"id\": 1, \"name\": \"cat\"}}")
    for cat in dataset["categories"]:
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int)):
            raise DataError(f"{source}: category {cat!r} has no integer 'id'")
    images = {}
    for info in dataset["images"]:
        if not (isinstance(info, dict) and isinstance(info.get("id"), int)):
            raise DataError(f"{source}: image record {str(info)[:80]} has no integer 'id'")
        where = f"{source}: image id {info['id']}"
        if info["id"] in images:
            raise DataError(f"{where} appears twice (as {images[info['id']].get('file_name')!r} "
                            f"and {info.get('file_name')!r}); image ids must be unique")
        for key in ("width", "height"):
            value = info.get(key)
            if not (isinstance(value, int) and value > 0):
                raise DataError(f"{where}: {key!r} must be a positive whole number of pixels, "
                                f"got {value!r}")
        name = info.get("file_name")
        if not (isinstance(name, str) and name):
            raise DataError(f"{where}: no 'file_name'")
        if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
                or ".." in PureWindowsPath(name).parts):
            raise DataError(f"{where}: file_name {name!r} points outside the image folder; "
                            f"give a path relative to it")
        images[info["id"]] = info
    categories = {c["id"] for c in dataset["categories"]}
    for ann in dataset["annotations"]:
        if not isinstance(ann, dict):
            raise DataError(f"{source}: annotation {str(ann)[:80]} is not an object")
        info = images.get(ann.get("image_id"))
        if info is None:
            raise DataError(f"{source}: annotation id {ann.get('id')} names image id "
                            f"{ann.get('image_id')!r}, which is not among the file's images")
        check_annotation(ann, info, categories, source, masks)


def check_annotation(ann: dict, image: dict, categories: set, source: str,
                     masks: bool = True) -> None:
    """Raise ``DataError`` for an annotation that cannot be a training target: an unknown
    category; a bad polygon, an RLE of another size, or (``masks``) no mask at all; a box
    that is not four finite numbers, has a negative side or lies outside its image. A box of
    zero width or height (COCO train2017 has two) is kept but is no training target."""
    where = f"{source}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
    if ann.get("category_id") not in categories:
        known = sorted(categories)
        raise DataError(f"{where}: category_id {ann.get('category_id')} is outside the file's "
                        f"{len(known)} categories (ids {known[0]}..{known[-1]})")
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if masks and not seg:
            raise DataError(f"{where}: 'segmentation' is empty; give a polygon or an RLE mask, "
                            f"or train boxes only (--no-masks)")
        for poly in seg:
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly)):
                n = len(poly) if isinstance(poly, list) else type(poly).__name__
                raise DataError(f"{where}: bad polygon ({n} values); a polygon is a flat list "
                                f"x1, y1, x2, y2, ... of at least 3 points")
    elif isinstance(seg, dict):
        size = list(seg.get("size", []))
        if size != [image["height"], image["width"]]:
            raise DataError(f"{where}: mask size {size} (height, width) does not match its "
                            f"image {image.get('file_name')!r}, which is "
                            f"{[image['height'], image['width']]}")
    elif masks:
        raise DataError(f"{where}: no 'segmentation' (a polygon list or an RLE mask); train "
                        f"boxes only with --no-masks")
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
        raise DataError(f"{where}: bbox must be four finite numbers [x, y, width, height], "
                        f"got {box!r}")
    x, y, w, h = box
    if w < 0 or h < 0:
        raise DataError(f"{where}: bbox {box} has a negative width or height; COCO boxes are "
                        f"[x, y, width, height]")
    W, H = image["width"], image["height"]
    if x < -BOX_SLACK or y < -BOX_SLACK or x + w > W + BOX_SLACK or y + h > H + BOX_SLACK:
        raise DataError(f"{where}: bbox {box} lies outside its {W}x{H} image "
                        f"{image['file_name']!r}; COCO boxes are [x, y, width, height] in pixels")


class CocoDetection(Dataset):
    """``(image, target)`` pairs from a COCO instances file and its image folder.

    ``image``: float tensor (3, H, W) in 0-1 after ``transforms`` (torchvision v2, applied to
    the image, boxes and masks together). ``target``: ``boxes`` (N, 4) xyxy pixels, ``labels``
    (N,) in 1..K, ``masks`` (N, H, W) uint8 when ``masks=True``, ``image_id``.
    ``train=True`` leaves out images with no usable object (they teach the RPN nothing and
    torchvision's reference does the same).
    """

    def __init__(self, images: str | Path, ann_file: str | Path, transforms=None,
                 masks: bool = True, train: bool = False):
        self.root = Path(images).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.coco = load_coco(ann_file, masks)
        self.source = Path(ann_file).name
        self.transforms, self.masks = transforms, masks
        cats = sorted(self.coco.getCatIds())
        self.cat_ids = cats
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cats)}
        self.classes = [self.coco.cats[c]["name"] for c in cats]
        ids = []
        limit = max_image_pixels()
        for image_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[image_id]
            pixels = info["width"] * info["height"]
            if pixels > limit:  # by the file's word; the header is checked again on loading
                raise ImageTooLargeError(
                    f"image {self.root / info['file_name']} is {info['width']}x"
                    f"{info['height']} ({pixels:,} pixels) by {self.source}, above the limit "
                    f"of {limit:,}; shrink it, or raise the limit with --max-image-pixels "
                    f"{pixels}")
            if not (self.root / info["file_name"]).is_file():
                raise DataError(f"{self.source}: image id {image_id} names "
                                f"{info['file_name']!r}, which is missing from {self.root}")
            anns = self.coco.imgToAnns.get(image_id, [])
            if train and not any(self._usable(a) for a in anns):
                continue
            ids.append(image_id)
        if not ids:
            raise DataError(f"{self.source}: no images{' with objects' if train else ''}")
        self.ids = ids

    def check_images(self) -> None:
        """Every image's header against the file's ``width``/``height`` (and the size limit),
        without decoding: run on the validation split before training, so that a bad image
        is not found only at the first evaluation, after the training steps before it."""
        from ..data.image_limits import image_size

        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            path = self.root / info["file_name"]
            size = image_size(path)
            if size != (info["width"], info["height"]):
                raise DataError(f"{path} is {size[0]}x{size[1]} but {self.source} says "
                                f"{info['width']}x{info['height']}; its masks would not fit it")

    @staticmethod
    def _usable(ann: dict) -> bool:
        return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> Image.Image:
        info = self.coco.imgs[self.ids[index]]
        path = self.root / info["file_name"]
        image = open_image(path, "RGB")  # size-checked by its header, 16-bit scaled
        if image.size != (info["width"], info["height"]):
            raise DataError(f"{path} is {image.size[0]}x{image.size[1]} but {self.source} says "
                            f"{info['width']}x{info['height']}; its masks would not fit it")
        return image

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = self.load_image(index)
        w, h = image.size
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if self._usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = dict(
            boxes=tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            labels=torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                dtype=torch.int64),
            image_id=image_id)
        if self.masks:
            with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation notice
                warnings.simplefilter("ignore", DeprecationWarning)
                m = (np.stack([self.coco.annToMask(a) for a in anns]) if anns
                     else np.zeros((0, h, w), np.uint8))
            target["masks"] = tv_tensors.Mask(torch.from_numpy(m))
        image = tv_tensors.Image(v2.functional.pil_to_tensor(image))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        if "masks" in target:
            target["masks"] = target["masks"].as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor), target


def train_transforms(size: int, scale_range: tuple[float, float] | None = (0.1, 2.0),
                     flip: bool = True):
    """Large-scale jitter as in the recipe: rescale to ``size`` times a random factor in
    ``scale_range``, then crop or pad to ``size`` x ``size``; horizontal flip; objects cut
    away by the crop are dropped. ``scale_range=None`` keeps the image as it is."""
    steps = [v2.ToImage()]
    if scale_range is not None:
        steps += [v2.ScaleJitter((size, size), scale_range=tuple(scale_range), antialias=True),
                  v2.RandomCrop((size, size), pad_if_needed=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1),
              v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


def eval_transforms():
    """Images as they are (the detector resizes them itself)."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def collate(batch):
    """Detection batches are lists: images keep their own sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)
