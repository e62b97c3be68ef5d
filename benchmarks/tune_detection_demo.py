"""Tune the detection demo's budget on held-out TRAINING scenes, with the from-scratch arm
only, so that no choice favours FCMAE (the demo's validation scenes are never looked at).

The demo's 256 training scenes (same seed, size and label set) are split: the first 192
train, the last 64 are the held-out set. Prints box AP / AP50, seconds and the load average.

    PYTHONPATH=src python benchmarks/tune_detection_demo.py --iters 600 --batch-size 4 \\
        --lr 2e-3 --box-batch 32 --output /tmp/tune_a
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def split_coco(ann: Path, n_keep: int, train_out: Path, held_out: Path) -> None:
    data = json.loads(ann.read_text())
    images = sorted(data["images"], key=lambda im: im["id"])
    for part, target in ((images[:n_keep], train_out), (images[n_keep:], held_out)):
        ids = {im["id"] for im in part}
        target.write_text(json.dumps(dict(data, images=part, annotations=[
            a for a in data["annotations"] if a["image_id"] in ids])))


def main() -> None:
    import torch

    from convnextv2.demos.transfer import TransferDemoConfig, _task
    from convnextv2.detection.train import DetectionData
    from convnextv2.transfer.engine import TransferConfig, train
    from convnextv2.transfer.synthetic import write_synthetic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--box-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    demo = TransferDemoConfig()
    out = Path(a.output)
    paths = write_synthetic(out / "data", demo.n_train, demo.n_val, demo.size, demo.seed,
                            objects=tuple(demo.objects), label_set=demo.label_set,
                            scale=tuple(demo.scale))
    r = paths["detection"]
    split_coco(r / "annotations/instances_train.json", 192, out / "train192.json",
               out / "heldout64.json")
    task = _task(demo, paths)
    task.data = DetectionData(r / "train", out / "train192.json", r / "train",
                              out / "heldout64.json")
    task.detector_kwargs["box_batch_size_per_image"] = a.box_batch
    t = time.time()
    summary = train(task, TransferConfig(
        output=str(out / "scratch"), depths=demo.depths, dims=demo.dims, iters=a.iters,
        batch_size=a.batch_size, eval_batch_size=16, lr=a.lr, weight_decay=0.05,
        layer_decay=1.0, schedule="cosine", warmup_steps=max(1, a.iters // 12), workers=0,
        seed=demo.seed, eval_every=a.iters, progress=False))
    m = summary["metrics"]
    print(json.dumps(dict(iters=a.iters, batch_size=a.batch_size, lr=a.lr,
                          box_batch=a.box_batch, bbox_AP=round(m["bbox_AP"], 2),
                          bbox_AP50=round(m["bbox_AP50"], 2), seconds=round(time.time() - t),
                          load=os.getloadavg())))


if __name__ == "__main__":
    main()
