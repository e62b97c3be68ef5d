"""COCO box and mask mAP through pycocotools' ``COCOeval``.

``to_coco_results`` turns torchvision detector outputs (xyxy boxes, labels 1..K, soft masks)
into COCO result records (xywh boxes, the file's category ids, RLE masks thresholded at 0.5);
``coco_map`` runs COCOeval on them. The twelve COCO numbers come back under their usual
names; ``AP`` is the primary metric (IoU 0.50:0.95).
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
import torch

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(outputs: Sequence[dict], image_ids: Sequence[int], cat_ids: Sequence[int],
                    mask_threshold: float = 0.5) -> list[dict]:
    """COCO result records for ``outputs`` (one dict per image, as torchvision's detectors
    return them in eval mode); ``cat_ids[label - 1]`` is the file's category of label."""
    from pycocotools import mask as mask_utils

    records = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if len(boxes) == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        rles = None
        if "masks" in out:
            binary = (out["masks"].detach().float().cpu()[:, 0] > mask_threshold).numpy()
            rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in binary]
        for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            rec = dict(image_id=int(image_id), category_id=int(cat_ids[label - 1]),
                       bbox=[round(v, 3) for v in box], score=float(score))
            if rles is not None:
                rle = dict(rles[k])
                rle["counts"] = rle["counts"].decode("ascii")
                rec["segmentation"] = rle
            records.append(rec)
    return records


def coco_map(coco_gt, results: list[dict], iou_type: str = "bbox",
             image_ids: Sequence[int] | None = None, verbose: bool = False) -> dict[str, float]:
    """COCOeval's twelve numbers for ``results`` against ``coco_gt`` (a pycocotools COCO),
    over ``image_ids`` (default: every image of ``coco_gt``). No detection at all scores 0."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval writes -1 where a size range has no ground truth; report those as 0
    return {name: max(float(v), 0.0) for name, v in zip(STAT_NAMES, ev.stats)}


@torch.no_grad()
def evaluate_detector(model, loader, dataset, device, amp: str = "none", info=None,
                      progress: bool = True) -> dict[str, float]:
    """Box (and mask) mAP of ``model`` on ``loader``'s images of ``dataset`` (a
    ``CocoDetection``). Under torchrun every rank runs its share and rank 0 scores them all;
    the returned dict is on every rank. Keys (percent): ``bbox_AP``, ``bbox_AP50``, ...
    ``segm_AP`` ...
    """
    from tqdm import tqdm

    from ..training.step import autocast

    model.eval()
    results, seen = [], []
    is_main = info is None or info.is_main
    for images, targets in tqdm(loader, desc="eval", disable=not (progress and is_main),
                                leave=False, dynamic_ncols=True):
        with autocast(device, amp):
            outputs = model([im.to(device) for im in images])
        ids = [t["image_id"] for t in targets]
        results += to_coco_results(outputs, ids, dataset.cat_ids)
        seen += ids
    if info is not None and info.distributed:
        import torch.distributed as dist
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, (results, seen))
        results = [r for part, _ in gathered for r in part]
        seen = [i for _, part in gathered for i in part]
    metrics = {}
    if is_main:
        kinds = ("bbox", "segm") if getattr(dataset, "masks", False) else ("bbox",)
        for kind in kinds:
            stats = coco_map(dataset.coco, results, kind, image_ids=sorted(set(seen)))
            metrics.update({f"{kind}_{k}": 100.0 * v for k, v in stats.items()})
    if info is not None and info.distributed:
        from ..training.distributed import broadcast_object
        metrics = broadcast_object(metrics)
    return metrics
