"""Semantic segmentation as a transfer ``Task``: ADE20K-layout data, UPerNet, mIoU.

The recipe's values (ConvNeXt V2 paper, ADE20K, UPerNet: 160k iterations) are
``SEGMENTATION_RECIPE`` in ``recipes/presets.py``; the training main is
``transfer/engine.py``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..transfer.engine import Task, TransferConfig
from .data import SegmentationFolder, collate, collate_eval, eval_transforms, train_transforms
from .evaluate import evaluate_segmenter
from .model import build_segmenter, segmentation_loss
from .inference import default_stride

class SegmentationTask(Task):
    name = "segment"
    primary_metric = "mIoU"
    resume_must_match = ("crop", "scale", "ratio_range", "num_classes", "reduce_zero_label",
                         "head", "photometric")

    def __init__(self, root: str | Path, crop: int = 512, scale: tuple[int, int] | None = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), num_classes: int | None = None,
                 reduce_zero_label: bool = True, eval_size: int | None = None,
                 aux_weight: float = 0.4, head_kwargs: dict | None = None,
                 photometric: bool = True, tta_scales=(1.0,), tta_flip: bool = False,
                 eval_mode: str = "slide", window: int | None = None, stride: int | None = None):
        self.root, self.crop, self.scale, self.ratio_range = Path(root), crop, scale, ratio_range
        window = window or crop
        # how the model is tested, saved with it: eval and predict default to this
        self.test = dict(mode=eval_mode, size=eval_size, window=int(window),
                         stride=int(stride or default_stride(window)),
                         reduce_zero_label=bool(reduce_zero_label))
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.eval_size, self.aux_weight = eval_size, aux_weight
        self.head_kwargs, self.photometric = dict(head_kwargs or {}), photometric
        self.tta_scales, self.tta_flip = tuple(tta_scales), tta_flip

    def options(self) -> dict:
        return dict(data=str(self.root), crop=self.crop, scale=self.scale,
                    ratio_range=self.ratio_range, num_classes=self.num_classes,
                    reduce_zero_label=self.reduce_zero_label, eval_size=self.eval_size,
                    aux_weight=self.aux_weight, head=self.head_kwargs,
                    photometric=self.photometric, test=self.test)

    def datasets(self, cfg: TransferConfig):
        train = SegmentationFolder(self.root, "train",
                                   train_transforms(self.crop, self.scale, self.ratio_range,
                                                    self.photometric),
                                   self.num_classes, self.reduce_zero_label)
        val = SegmentationFolder(self.root, "val", eval_transforms(self.eval_size),
                                 self.num_classes, self.reduce_zero_label)
        val.check_masks(cfg.workers)  # before training, not at the first evaluation
        return train, val

    def collate(self, train: bool):
        return collate if train else collate_eval

    def build_model(self, backbone, classes: list[str]):
        return build_segmenter(len(classes), backbone, test=self.test, **self.head_kwargs)

    def prepare_distributed(self, model, info):
        """SyncBatchNorm in the heads under multi-GPU DDP (PyTorch's SyncBatchNorm is
        GPU-only: CPU processes keep per-process BatchNorm statistics)."""
        if (info.distributed and info.device.type == "cuda"
                and getattr(model, "config", {}).get("norm", "bn") == "bn"):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def losses(self, model, batch, device):
        images, masks = batch
        outputs = model(images.to(device, non_blocking=True))
        return segmentation_loss(outputs, masks.to(device), self.aux_weight)

    def evaluate(self, model, loader, dataset, cfg, info):
        return evaluate_segmenter(model, loader, dataset.num_classes, info.device, cfg.amp,
                                  info, progress=cfg.progress, scales=self.tta_scales,
                                  flip=self.tta_flip, mode=self.test["mode"],
                                  window=self.test["window"], stride=self.test["stride"])
