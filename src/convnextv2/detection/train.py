"""Detection as a transfer ``Task``: COCO data, Mask R-CNN, COCO mAP.

The recipe's values (ConvNeXt V2 paper, COCO, Mask R-CNN 3x) are ``DETECTION_RECIPE`` in
``recipes/presets.py``; the training main is ``transfer/engine.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..transfer.engine import Task, TransferConfig
from .data import CocoDetection, collate, eval_transforms, train_transforms
from .evaluate import evaluate_detector
from .model import COCO_ANCHOR_SIZES, build_detector

@dataclass
class DetectionData:
    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path


def find_coco(root: str | Path) -> DetectionData:
    """``ROOT/annotations/instances_<split>*.json`` and the image folder named after it
    (``instances_train2017.json`` -> ``ROOT/train2017``, ``instances_val.json`` -> ``ROOT/val``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} does not exist (give a COCO root with "
                                f"annotations/instances_train2017.json and train2017/, or "
                                f"'builtin')")
    found = {}
    for split in ("train", "val"):
        files = sorted((root / "annotations").glob(f"instances_{split}*.json"))
        if not files:
            raise FileNotFoundError(f"{root}/annotations has no instances_{split}*.json "
                                    f"(the COCO layout); pass --{split}-ann and --{split}-images")
        ann = files[-1]
        images = root / ann.stem[len("instances_"):]
        if not images.is_dir():
            raise FileNotFoundError(f"{ann.name} is there but its image folder {images} is not")
        found[split] = (images, ann)
    return DetectionData(found["train"][0], found["train"][1], found["val"][0], found["val"][1])


class DetectionTask(Task):
    name = "detect"
    primary_metric = "bbox_AP"
    find_unused_parameters = True  # a crop can leave an image without objects
    resume_must_match = ("img_size", "scale_range", "masks", "detector")

    def __init__(self, data: DetectionData, img_size: int = 1024,
                 scale_range: tuple[float, float] | None = (0.1, 2.0), masks: bool = True,
                 detector_kwargs: dict | None = None):
        self.data, self.img_size, self.scale_range = data, img_size, scale_range
        self.masks, self.detector_kwargs = masks, dict(detector_kwargs or {})

    def options(self) -> dict:
        return dict(data={k: str(v) for k, v in vars(self.data).items()},
                    img_size=self.img_size, scale_range=self.scale_range, masks=self.masks,
                    detector=self.detector_kwargs)

    def datasets(self, cfg: TransferConfig):
        train = CocoDetection(self.data.train_images, self.data.train_ann,
                              train_transforms(self.img_size, self.scale_range),
                              masks=self.masks, train=True)
        val = CocoDetection(self.data.val_images, self.data.val_ann, eval_transforms(),
                            masks=self.masks)
        if train.cat_ids != val.cat_ids:
            raise ValueError(f"{self.data.train_ann.name} and {self.data.val_ann.name} define "
                             f"different categories")
        val.check_images()  # before training, not at the first evaluation
        self.category_ids = list(train.cat_ids)
        return train, val

    def collate(self, train: bool):
        return collate

    def build_model(self, backbone, classes: list[str]):
        kwargs = dict(min_size=self.img_size, max_size=self.img_size)
        kwargs.update(self.detector_kwargs)
        kwargs.setdefault("anchor_sizes", COCO_ANCHOR_SIZES)
        model = build_detector(len(classes), backbone, masks=self.masks, **kwargs)
        # saved with the model: ``detect predict --json`` writes the file's own category ids
        model.config["category_ids"] = list(getattr(self, "category_ids", []))
        return model

    def losses(self, model, batch, device):
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        losses = model(images, targets)
        losses = {k: v.float() for k, v in losses.items()}
        losses["loss"] = sum(losses.values())
        return losses

    def evaluate(self, model, loader, dataset, cfg, info):
        return evaluate_detector(model, loader, dataset, info.device, cfg.amp, info,
                                 progress=cfg.progress)
