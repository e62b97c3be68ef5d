"""Semantic segmentation as a transfer ``Task``: ADE20K-layout data, UPerNet, mIoU.

Recipe defaults (ConvNeXt V2 paper, ADE20K, UPerNet): 160k iterations of 16 images (512 x 512
crops), AdamW lr 1e-4 (swept 1e-4 to 3e-4), weight decay 0.05, poly schedule (power 1) after
1500 warmup iterations, 'stage_wise' layer decay 0.9, drop path 0.4 (swept 0.1-0.4), PPM pool
scales (1, 2, 3, 6), 512 head channels, auxiliary FCN head with loss weight 0.4.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..transfer.backbone import build_backbone
from ..transfer.engine import Task, TransferConfig
from .data import SegmentationFolder, collate, eval_transforms, train_transforms
from .evaluate import evaluate_segmenter
from .model import build_segmenter, segmentation_loss

RECIPE = dict(iters=160_000, batch_size=16, lr=1e-4, weight_decay=0.05, layer_decay=0.9,
              layer_decay_mode="stage_wise", drop_path=0.4, schedule="poly", warmup_iters=1500,
              warmup_ratio=1e-6, crop=512, ratio_range=(0.5, 2.0), aux_weight=0.4)


class SegmentationTask(Task):
    name = "segment"
    primary_metric = "mIoU"

    def __init__(self, root: str | Path, crop: int = 512, scale: tuple[int, int] | None = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), num_classes: int | None = None,
                 reduce_zero_label: bool = True, eval_size: int | None = None,
                 aux_weight: float = 0.4, head_kwargs: dict | None = None,
                 photometric: bool = True, tta_scales=(1.0,), tta_flip: bool = False):
        self.root, self.crop, self.scale, self.ratio_range = Path(root), crop, scale, ratio_range
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.eval_size, self.aux_weight = eval_size, aux_weight
        self.head_kwargs, self.photometric = dict(head_kwargs or {}), photometric
        self.tta_scales, self.tta_flip = tuple(tta_scales), tta_flip

    def datasets(self, cfg: TransferConfig):
        train = SegmentationFolder(self.root, "train",
                                   train_transforms(self.crop, self.scale, self.ratio_range,
                                                    self.photometric),
                                   self.num_classes, self.reduce_zero_label)
        val = SegmentationFolder(self.root, "val", eval_transforms(self.eval_size),
                                 self.num_classes, self.reduce_zero_label)
        return train, val

    def collate(self, train: bool):
        return collate

    def build_model(self, cfg: TransferConfig, classes: list[str]):
        backbone = build_backbone(cfg.model, cfg.pretrained, drop_path_rate=cfg.drop_path,
                                  depths=cfg.depths, dims=cfg.dims, stem_stride=cfg.stem_stride)
        return build_segmenter(len(classes), backbone, **self.head_kwargs)

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
                                  flip=self.tta_flip)
