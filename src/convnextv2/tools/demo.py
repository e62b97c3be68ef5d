"""The built-in demo: does FCMAE pretraining help a small ConvNeXt V2 on Fashion-MNIST?

On the packaged Fashion-MNIST subset (10k train / 2k test, 28x28 gray, resized to 32 px) it
1. FCMAE-pretrains a small ConvNeXt V2 (stem stride 1, so the mask patch is 8 px: a 4x4 grid)
   on all 10,000 training images, labels unused,
2. fine-tunes that encoder on a labelled quarter of them (2,500 images),
3. fine-tunes the same architecture from random weights on the same 2,500 images with the same
   budget (epochs, batch, lr schedule, augmentation, seed; no layer-wise lr decay, which only
   makes sense for pretrained layers),
then evaluates both on the 2,000 test images, prints a comparison table and writes a report
folder. Whichever wins is reported as is. The labelled quarter is the setting self-supervised
pretraining is for, and it keeps the demo within about 10 minutes on 2 busy CPU cores.
``quick=True`` shrinks everything to a smoke test (tests use it).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    quick: bool = False
    depths: tuple = (1, 1, 2, 1)          # atto's shape, shallower and narrower for 2 CPU cores
    dims: tuple = (16, 32, 64, 128)
    img_size: int = 32
    pretrain_epochs: int = 6
    pretrain_batch_size: int = 128
    pretrain_lr: float = 2e-3
    decoder_dim: int = 128
    mask_ratio: float = 0.6
    finetune_epochs: int = 4
    finetune_lr: float = 2e-3
    batch_size: int = 64
    train_subset: int | None = 2500       # labelled images for fine-tuning
    val_subset: int | None = None
    max_steps_per_epoch: int | None = None
    seed: int = 0
    threads: int | None = None            # torch threads; None: 1 on a busy machine, else default
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick_config(cls, output: str) -> "DemoConfig":
        return cls(output=output, quick=True, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                   pretrain_epochs=1, finetune_epochs=1, decoder_dim=32, batch_size=32,
                   pretrain_batch_size=32,
                   train_subset=256, val_subset=256, max_steps_per_epoch=4, progress=False)


def _arch(cfg: DemoConfig) -> dict:
    return dict(depths=tuple(cfg.depths), dims=tuple(cfg.dims), stem_stride=1, in_chans=1)


def run_demo(cfg: DemoConfig) -> dict:
    """Pretrain, fine-tune twice, compare; returns the results dict also written as JSON."""
    from ..recipes.finetune import FinetuneConfig, finetune
    from ..recipes.pretrain import PretrainConfig, pretrain

    import torch

    load_at_start = _load_average()
    threads = cfg.threads or _pick_threads()
    torch.set_num_threads(threads)
    out = Path(cfg.output)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    arch = _arch(cfg)
    t0 = time.time()

    _say(cfg, f"using {threads} CPU thread(s) for torch" if not torch.cuda.is_available()
         else f"device: {torch.cuda.get_device_name()}")
    _say(cfg, f"[1/3] FCMAE pretraining: depths {arch['depths']}, dims {arch['dims']}, "
              f"{cfg.img_size} px, patch 8, mask ratio {cfg.mask_ratio}, "
              f"{cfg.pretrain_epochs} epochs")
    pre_cfg = PretrainConfig(
        model="convnextv2_atto", data="builtin", output=str(out / "pretrain"),
        epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch_size, img_size=cfg.img_size,
        in_chans=1, stem_stride=1, depths=arch["depths"], dims=arch["dims"],
        mask_ratio=cfg.mask_ratio, decoder_dim=cfg.decoder_dim, lr=cfg.pretrain_lr,
        warmup_epochs=min(1.0, cfg.pretrain_epochs / 4), workers=0, seed=cfg.seed,
        recon_every=0, progress=cfg.progress,
        max_steps=(cfg.max_steps_per_epoch * cfg.pretrain_epochs
                   if cfg.max_steps_per_epoch else None))
    t = time.time()
    pre = pretrain(pre_cfg)
    pretrain_time = time.time() - t
    encoder = out / "pretrain" / "encoder.safetensors"

    runs = {}
    for i, (name, ckpt) in enumerate((("FCMAE + fine-tune", encoder), ("from scratch", None))):
        _say(cfg, f"[{i + 2}/3] fine-tuning {name}: {cfg.finetune_epochs} epochs")
        ft_cfg = FinetuneConfig(
            model=None, model_kwargs=dict(arch), data="builtin",
            output=str(out / ("finetune_pretrained" if ckpt else "finetune_scratch")),
            finetune=str(ckpt) if ckpt else None, recipe="atto", img_size=cfg.img_size,
            epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, lr=cfg.finetune_lr,
            warmup_epochs=min(0.5, cfg.finetune_epochs / 4), weight_decay=0.05,
            drop_path=0.0, smoothing=0.1, auto_augment="none", reprob=0.0,
            crop_scale=(0.5, 1.0), model_ema=False, train_subset=cfg.train_subset,
            # layer-wise lr decay is a fine-tuning device for pretrained layers; a network
            # trained from scratch gets every layer at the full rate, as in supervised training
            layer_decay=0.9 if ckpt else 1.0,
            val_subset=cfg.val_subset,
            max_steps_per_epoch=cfg.max_steps_per_epoch, seed=cfg.seed, progress=cfg.progress,
            **cfg.extra)
        t = time.time()
        s = finetune(ft_cfg)
        runs[name] = dict(summary=s, time_s=time.time() - t)

    results = _results(cfg, pre, pretrain_time, runs, time.time() - t0)
    results["machine"] = dict(torch_threads=threads, load_average_at_start=load_at_start,
                              device="cuda" if torch.cuda.is_available() else "cpu")
    _write_report(report, out, results, runs)
    table = format_table(results)
    (report / "table.md").write_text(table + "\n")
    print(table, flush=True)
    print(f"report: {report}", flush=True)
    return results


def _results(cfg, pre, pretrain_time, runs, total) -> dict:
    rows = []
    for name, r in runs.items():
        s = r["summary"]
        final = s["final"] or {}
        best_key = "ema_val" if s["best_source"] == "ema" else "val"
        best_rec = next(h for h in s["history"] if h["epoch"] == s["best_epoch"])
        rows.append(dict(run=name, top1=s["best_top1"], top5=best_rec[f"{best_key}_top5"],
                         weights=s["best_source"], best_epoch=s["best_epoch"],
                         final_top1=final.get("val_top1"), final_ema_top1=final.get("ema_val_top1"),
                         finetune_time_s=r["time_s"],
                         total_time_s=r["time_s"] + (pretrain_time if "FCMAE" in name else 0.0)))
    pretrained, scratch = rows
    return dict(config=dict(depths=list(cfg.depths), dims=list(cfg.dims), img_size=cfg.img_size,
                            stem_stride=1, patch_size=8, mask_ratio=cfg.mask_ratio,
                            pretrain_epochs=cfg.pretrain_epochs,
                            finetune_epochs=cfg.finetune_epochs, batch_size=cfg.batch_size,
                            finetune_images=cfg.train_subset or 10000,
                            pretrain_images=10000,
                            val_images=cfg.val_subset or 2000, quick=cfg.quick),
                pretrain=dict(time_s=pretrain_time, last_loss=pre.get("last_loss"),
                              steps=pre.get("global_step")),
                runs=rows, winner=max(rows, key=lambda r: r["top1"])["run"],
                top1_gain=pretrained["top1"] - scratch["top1"], total_time_s=total)


def format_table(results: dict) -> str:
    c = results["config"]
    lines = [f"ConvNeXt V2 depths {tuple(c['depths'])} dims {tuple(c['dims'])}, {c['img_size']} px "
             f"gray, stem stride 1 (mask patch 8 px); built-in Fashion-MNIST subset: FCMAE "
             f"{c['pretrain_epochs']} epochs on the 10000 training images (no labels), "
             f"fine-tuning {c['finetune_epochs']} epochs on {c['finetune_images']} labelled "
             f"ones, top-1/top-5 on the {c['val_images']} test images", "",
             "| run | top-1 (%) | top-5 (%) | weights | fine-tune time (s) | total time (s) |",
             "|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['run']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['weights']} "
                     f"(epoch {r['best_epoch']}) | {r['finetune_time_s']:.0f} | "
                     f"{r['total_time_s']:.0f} |")
    gain = results["top1_gain"]
    lines += ["", f"FCMAE pretraining: {results['pretrain']['time_s']:.0f} s; "
                  f"{'pretrained' if gain > 0 else 'scratch'} run ahead by {abs(gain):.2f} "
                  f"points of top-1; whole demo {results['total_time_s']:.0f} s"]
    return "\n".join(lines)


def _write_report(report: Path, out: Path, results: dict, runs: dict) -> None:
    import shutil

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (report / "metrics.json").write_text(json.dumps(results, indent=2))
    for src, dst in (("pretrain/reconstruction.png", "reconstruction.png"),
                     ("pretrain/loss_curve.png", "pretrain_loss.png")):
        if (out / src).is_file():
            shutil.copyfile(out / src, report / dst)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, r), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        h = r["summary"]["history"]
        ep = [x["epoch"] for x in h]
        axes[0].plot(ep, [x["val_top1"] for x in h], marker="o", color=color, label=name)
        if "ema_val_top1" in h[0]:
            axes[0].plot(ep, [x["ema_val_top1"] for x in h], ls="--", marker=".", color=color,
                         label=f"{name} (EMA)")
        axes[1].plot(ep, [x["train_loss"] for x in h], marker="o", color=color,
                     label=f"{name} train")
        axes[1].plot(ep, [x["val_loss"] for x in h], ls="--", marker=".", color=color,
                     label=f"{name} test")
    axes[0].set(xlabel="epoch", ylabel="test top-1 (%)", title="accuracy")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].set(xlabel="epoch", ylabel="loss", title="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "finetune_curves.png", dpi=100)
    plt.close(fig)


def _pick_threads() -> int:
    """torch's default (one thread per core) unless the machine is already busy: then two
    OpenMP threads per process spin against the other processes and small models run several
    times slower than with one thread (measured on the shared 2-core machine)."""
    import os

    import torch
    load = _load_average()
    busy = load is not None and load >= (os.cpu_count() or 1)
    return 1 if busy else torch.get_num_threads()


def _load_average() -> float | None:
    import os
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _say(cfg: DemoConfig, msg: str) -> None:
    print(msg, flush=True)
