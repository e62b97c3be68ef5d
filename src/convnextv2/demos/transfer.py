"""The transfer demos: does FCMAE pretraining help a small ConvNeXt V2 detect or segment?

On synthetic scenes built from the packaged Fashion-MNIST subset (``transfer.synthetic``):

1. writes 256 labelled training scenes and 64 validation scenes (COCO JSON + image folders,
   and ADE20K-layout image + mask-PNG folders), plus a pool of unlabelled scenes;
2. FCMAE-pretrains a small ConvNeXt V2 (depths 1,1,2,1, dims 24,48,96,192, 128 px input,
   32 px mask patches: a 4x4 grid, 60% masked) on the unlabelled pool and the training
   images, labels unused; or takes the encoder given with ``pretrained``;
3. trains Mask R-CNN (``task="detection"``) or UPerNet (``"segmentation"``) twice with the
   same budget, data, schedule and seed: once on the pretrained encoder (layer decay 0.9),
   once from random weights (no layer decay, which only makes sense for pretrained layers);
4. scores both on the validation scenes (COCO box/mask mAP, or mIoU and pixel accuracy),
   prints a table and writes ``OUTPUT/report/`` (``table.md``, ``results.json``, curves and
   a prediction picture per run).

Everything goes through the same readers, model builders and training loop as
``convnextv2 detect|segment train``. Whichever run wins is reported as it is.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..training.output import fresh_output
from .runner import Job, load_average, pick_threads, run_jobs, say

TASKS = ("detection", "segmentation")


@dataclass
class TransferDemoConfig:
    task: str = "detection"
    output: str = "runs/demo_detection"
    pretrained: str | None = None        # an encoder to reuse instead of pretraining
    size: int = 128
    n_train: int = 256
    n_val: int = 64
    n_unlabelled: int = 768
    label_set: str = "coarse"            # top / trousers / footwear / bag ("fine": 10 classes)
    objects: tuple = (2, 4)              # garments per scene
    scale: tuple = (0.3, 0.55)           # garment side as a fraction of the canvas
    depths: tuple = (1, 1, 2, 1)
    dims: tuple = (24, 48, 96, 192)
    pretrain_epochs: int = 3
    pretrain_batch_size: int = 32
    pretrain_lr: float = 2e-3
    decoder_dim: int = 64
    mask_ratio: float = 0.6
    iters: int | None = None             # None: 1500 (detection, batch 4) / 1200 (segmentation, batch 8)
    batch_size: int | None = None
    lr: float | None = None              # None: 2e-3 (both; tuning record in docs/transfer.md)
    layer_decay: float = 0.9
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    quick: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick_config(cls, task: str, output: str) -> "TransferDemoConfig":
        return cls(task=task, output=output, quick=True, size=64, n_train=8, n_val=4,
                   n_unlabelled=8, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                   pretrain_epochs=1, pretrain_batch_size=8, decoder_dim=16, iters=4,
                   batch_size=2, progress=False)


def run_transfer_demo(cfg: TransferDemoConfig) -> dict:
    """Write the scenes, pretrain (unless given an encoder), train twice, compare."""
    import torch

    if cfg.task not in TASKS:
        raise ValueError(f"--task {cfg.task!r}: choose one of {', '.join(TASKS)}")
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {cfg.pretrained} does not exist")
    out = fresh_output(cfg.output)
    report = out / "report"
    report.mkdir()
    load_at_start = load_average()
    torch.set_num_threads(pick_threads(cfg.threads))
    t0 = time.time()
    paths = _write_scenes(cfg, out)
    encoder, shape, pretrain_time = _encoder(cfg, out, paths["unlabelled"])
    detection = cfg.task == "detection"
    iters = cfg.iters or (1500 if detection else 1200)  # tuning records in docs
    batch = cfg.batch_size or (4 if detection else 8)
    lr = cfg.lr or 2e-3
    jobs = []
    for i, (name, ckpt) in enumerate((("FCMAE-pretrained", encoder), ("from scratch", None))):
        tag = "pretrained" if ckpt else "scratch"
        run = dict(output=str(out / tag), pretrained=str(ckpt) if ckpt else None,
                   depths=None if ckpt else shape[0], dims=None if ckpt else shape[1],
                   iters=iters, batch_size=batch, eval_batch_size=16, lr=lr,
                   weight_decay=0.05, layer_decay=cfg.layer_decay if ckpt else 1.0,
                   layer_decay_mode="layer_wise" if detection else "stage_wise",
                   schedule="cosine" if detection else "poly",
                   warmup_steps=max(1, iters // 12), workers=0, seed=cfg.seed,
                   eval_every=iters, progress=cfg.progress, **cfg.extra)
        jobs.append(Job(name, f"{__name__}:train_arm", dict(
            demo=asdict(cfg), paths={k: str(v) for k, v in paths.items()}, run=run,
            picture=str(report / f"prediction_{tag}.png"),
            announce=f"[{i + 3}/4] {cfg.task}, {name} backbone: {iters} steps of {batch} "
                     f"images")))
    records = run_jobs(jobs)
    runs = {job.name: dict(metrics=records[job.name]["metrics"],
                           time_s=records[job.name]["seconds"],
                           output=records[job.name]["output"]) for job in jobs}

    results = dict(task=cfg.task, config=asdict(cfg), pretrain_time_s=pretrain_time,
                   runs=runs, total_time_s=time.time() - t0,
                   load_average_at_start=load_at_start, load_average_at_end=load_average(),
                   threads=torch.get_num_threads())
    table = format_table(results)
    (report / "table.md").write_text(table + "\n")
    (report / "results.json").write_text(json.dumps(results, indent=2, default=str))
    say("\n" + table)
    return results


def _write_scenes(cfg: TransferDemoConfig, out: Path) -> dict[str, Path]:
    """The labelled scenes of both tasks and the unlabelled pool (which also gets the
    training images, without their labels)."""
    from ..transfer.synthetic import write_synthetic, write_unlabelled

    say(f"[1/4] writing {cfg.n_train} + {cfg.n_val} labelled scenes and {cfg.n_unlabelled} "
        f"unlabelled ones ({cfg.size} px) to {out / 'data'}")
    paths = write_synthetic(out / "data", cfg.n_train, cfg.n_val, cfg.size, cfg.seed,
                            objects=tuple(cfg.objects), label_set=cfg.label_set,
                            scale=tuple(cfg.scale))
    pool = write_unlabelled(out / "data" / "unlabelled", cfg.n_unlabelled, cfg.size, cfg.seed,
                            tuple(cfg.objects), tuple(cfg.scale))
    for p in sorted((paths["detection"] / "train").iterdir()):
        shutil.copyfile(p, pool / p.name)
    return dict(paths, unlabelled=pool)


def _encoder(cfg: TransferDemoConfig, out: Path, pool: Path) -> tuple[Path, tuple, float]:
    """(encoder file, its (depths, dims), pretraining seconds): the given one, or FCMAE
    pretraining on the unlabelled pool."""
    from ..recipes.pretrain import PretrainConfig, pretrain

    if cfg.pretrained:
        say(f"[2/4] using the given encoder {cfg.pretrained} (no pretraining)")
        return Path(cfg.pretrained), _shape(Path(cfg.pretrained)), 0.0
    depths, dims = tuple(cfg.depths), tuple(cfg.dims)
    say(f"[2/4] FCMAE pretraining: depths {depths}, dims {dims}, {cfg.size} px, patch 32, "
        f"mask ratio {cfg.mask_ratio}, {cfg.pretrain_epochs} epochs on "
        f"{cfg.n_unlabelled + cfg.n_train} images")
    t = time.time()
    pretrain(PretrainConfig(
        model="convnextv2_atto", data=str(pool), output=str(out / "pretrain"),
        epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch_size, img_size=cfg.size,
        in_chans=3, depths=depths, dims=dims, mask_ratio=cfg.mask_ratio,
        decoder_dim=cfg.decoder_dim, lr=cfg.pretrain_lr,
        warmup_epochs=min(1.0, cfg.pretrain_epochs / 4), workers=0, seed=cfg.seed,
        recon_every=0, progress=cfg.progress))
    return out / "pretrain" / "encoder.safetensors", (depths, dims), time.time() - t


def train_arm(demo: dict, paths: dict, run: dict, picture: str, announce: str) -> dict:
    """One arm of the demo (a job of the runner): train ``run`` (``TransferConfig`` fields)
    on the scenes, then draw its predictions on the first validation scenes."""
    from ..transfer.engine import TransferConfig, train

    say(announce)
    cfg = TransferDemoConfig(**demo)
    paths = {k: Path(v) for k, v in paths.items()}
    summary = train(_task(cfg, paths), TransferConfig(**run))
    _picture(cfg, Path(summary["output"]), paths, Path(picture))
    return dict(metrics=summary["metrics"], output=summary["output"])


def _shape(encoder: Path):
    from ..checkpoint import infer_config
    cfg = infer_config(str(encoder))
    return tuple(cfg["depths"]), tuple(cfg["dims"])


def _task(cfg: TransferDemoConfig, paths: dict):
    if cfg.task == "detection":
        from ..detection.train import DetectionData, DetectionTask
        r = paths["detection"]
        data = DetectionData(r / "train", r / "annotations/instances_train.json", r / "val",
                             r / "annotations/instances_val.json")
        return DetectionTask(data, img_size=cfg.size, scale_range=(0.75, 1.25), detector_kwargs=dict(
            fpn_channels=64, box_head_dim=256, mask_head_dim=64,
            anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_train=300,
            rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=100, box_batch_size_per_image=64,
            box_positive_fraction=0.5, box_detections_per_img=20,
            roi_canonical_scale=48))
    from ..segmentation.train import SegmentationTask
    return SegmentationTask(paths["segmentation"], crop=cfg.size, scale=(cfg.size, cfg.size),
                            ratio_range=(0.75, 1.25), eval_mode="whole",
                            head_kwargs=dict(channels=64, aux_channels=32))


def _picture(cfg, run: Path, paths: dict, target: Path) -> None:
    """The first four validation scenes with the run's predictions drawn on them, side by
    side (enlarged 2x, so labels stay readable)."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    if cfg.task == "detection":
        from ..detection.visualize import load_detector as load, predict_and_draw as draw
        folder, kwargs = paths["detection"] / "val", dict(score_thresh=0.5)
    else:
        from ..segmentation.visualize import load_segmenter as load, predict_and_draw as draw
        folder, kwargs = paths["segmentation"] / "images" / "validation", {}
    model, classes = load(run / "model.pt")
    tiles = []
    for path in sorted(folder.iterdir())[:4]:
        pixels = F.pil_to_tensor(Image.open(path).convert("RGB"))
        big = [2 * pixels.shape[-2], 2 * pixels.shape[-1]]
        if cfg.task == "detection":  # the detector resizes its input itself
            tiles.append(draw(model, F.resize(pixels, big), classes, **kwargs)[0])
        else:
            tiles.append(F.resize(draw(model, pixels, classes, **kwargs)[0], big,
                                  interpolation=F.InterpolationMode.NEAREST))
    Image.fromarray(torch.cat(tiles, dim=2).permute(1, 2, 0).numpy()).save(target)


def format_table(results: dict) -> str:
    det = results["task"] == "detection"
    keys = (["bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"] if det
            else ["mIoU", "aAcc", "mAcc"])
    head = "| backbone | " + " | ".join(keys) + " | time (s) |"
    lines = [head, "|---" * (len(keys) + 2) + "|"]
    for name, run in results["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{run['metrics'].get(k, 0.0):.2f}" for k in keys)
                     + f" | {run['time_s']:.0f} |")
    primary = keys[0]
    runs = list(results["runs"].values())
    gap = runs[0]["metrics"].get(primary, 0.0) - runs[1]["metrics"].get(primary, 0.0)
    lines.append("")
    lines.append(f"FCMAE pretraining: {results['pretrain_time_s']:.0f} s; pretrained run "
                 f"{'ahead' if gap >= 0 else 'behind'} by {abs(gap):.2f} points of {primary}; "
                 f"whole demo {results['total_time_s']:.0f} s")
    return "\n".join(lines)
