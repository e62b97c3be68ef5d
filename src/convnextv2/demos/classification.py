"""The built-in demo: does FCMAE pretraining help a small ConvNeXt V2 on Fashion-MNIST?

On the packaged Fashion-MNIST subset (10k train / 2k test, 28x28 gray, padded to 32 px) it
1. FCMAE-pretrains a small ConvNeXt V2 (stem stride 1, so the mask patch is 8 px: a 4x4 grid)
   on all 10,000 training images, labels unused;
2. fine-tunes that encoder on a labelled quarter of them (2,500 images), once per seed;
3. trains the same architecture from random weights on the same 2,500 images with the same
   budget and seed (epochs, batch, lr schedule, augmentation; no layer-wise lr decay, which
   only makes sense for pretrained layers);
then evaluates every run on the 2,000 test images and prints mean ± std over the seeds per arm.

Why several seeds: at this budget one seed moves top-1 by about a point, which is the size of
the effect being measured. Each seed draws its own 2,500 labelled images, head init, data order
and augmentation; both arms of a seed share them, so the per-seed difference is a paired one.
Whether FCMAE's gain exceeds the seed spread is stated, not left to the reader.

The fine-tuning recipe is ``convnextv2.recipes.presets.SMALL_IMAGE_SHORT`` (RandomCrop with
padding 4, no eval resize, no RandAugment/mixup/cutmix/erasing/EMA, label smoothing 0.1): the
official ImageNet recipe hides most of the accuracy on 28 px images in 4 epochs. How it was
chosen, on images held out from the training split, is in that module.
``quick=True`` shrinks everything to a smoke test of a few seconds (tests use it).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..training.output import fresh_output
from .runner import Job, load_average, pick_jobs, pick_threads, run_jobs, say

ARMS = ("FCMAE + fine-tune", "from scratch")


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    quick: bool = False
    data: str = "builtin"
    depths: tuple = (1, 1, 2, 1)          # atto's shape, shallower and narrower for 2 CPU cores
    dims: tuple = (16, 32, 64, 128)
    img_size: int = 32
    pretrain_epochs: int = 6
    pretrain_batch_size: int = 128
    pretrain_lr: float = 2e-3
    decoder_dim: int = 128
    mask_ratio: float = 0.6
    seeds: int = 3                        # fine-tuning seeds per arm
    finetune_epochs: int | None = None    # None: the preset's
    train_subset: int | None = 2500       # labelled images for fine-tuning
    val_subset: int | None = None
    max_steps_per_epoch: int | None = None
    seed: int = 0                         # pretraining seed; fine-tuning uses seed .. seed+seeds-1
    threads: int | None = None            # torch threads; None: 1 on a busy machine, else default
    jobs: int | None = None               # fine-tuning runs side by side; None: 2 if 2+ cores
    progress: bool = True
    finetune_overrides: dict = field(default_factory=dict)  # on top of the preset

    @classmethod
    def quick_config(cls, output: str) -> "DemoConfig":
        return cls(output=output, quick=True, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                   pretrain_epochs=1, finetune_epochs=1, decoder_dim=32,
                   pretrain_batch_size=32, seeds=2, train_subset=256, val_subset=256,
                   max_steps_per_epoch=4, progress=False, jobs=1,
                   finetune_overrides=dict(batch_size=32))


def _arch(cfg: DemoConfig) -> dict:
    return dict(depths=tuple(cfg.depths), dims=tuple(cfg.dims), stem_stride=1, in_chans=1)


def pretrain_kwargs(cfg: DemoConfig, data: str, output: str) -> dict:
    """``PretrainConfig`` keyword arguments of the demo's FCMAE run (the preset sweep reuses
    them, on its own data folder)."""
    arch = _arch(cfg)
    return dict(model="convnextv2_atto", data=data, output=output,
                epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch_size,
                img_size=cfg.img_size, in_chans=1, stem_stride=1, depths=arch["depths"],
                dims=arch["dims"], mask_ratio=cfg.mask_ratio, decoder_dim=cfg.decoder_dim,
                lr=cfg.pretrain_lr, warmup_epochs=min(1.0, cfg.pretrain_epochs / 4), workers=0,
                seed=cfg.seed, recon_every=0, progress=cfg.progress,
                max_steps=(cfg.max_steps_per_epoch * cfg.pretrain_epochs
                           if cfg.max_steps_per_epoch else None))


def monitor_kwargs(cfg: DemoConfig) -> dict:
    """The pretraining probes the demo shows (k-NN accuracy and feature collapse, labels of
    the same data): at the start, half way and at the end, on at most 500 training images
    as the bank and 500 test images as queries, a few seconds each."""
    return dict(monitor_data=cfg.data, monitor_every=max(1, cfg.pretrain_epochs // 2),
                monitor_images=64 if cfg.quick else 500)


def pretrain_probes(folder: Path) -> list[dict]:
    """The monitor records of a pretraining run (``metrics.jsonl`` lines with ``knn_top1``)."""
    from ..training.metrics import read_metrics
    return [r for r in read_metrics(folder / "metrics.jsonl") if "knn_top1" in r]


def finetune_kwargs(cfg: DemoConfig, data: str, output: str, seed: int,
                    checkpoint: str | None, **overrides) -> dict:
    """``FinetuneConfig`` keyword arguments of one demo fine-tuning run (pretrained when
    ``checkpoint`` is given, else from scratch), preset values first."""
    from ..recipes.presets import small_image_finetune

    recipe = small_image_finetune(checkpoint is not None,
                                  **{**cfg.finetune_overrides, **overrides})
    if cfg.finetune_epochs:
        recipe["epochs"] = cfg.finetune_epochs
    return dict(model=None, model_kwargs=_arch(cfg), data=data, output=output,
                finetune=checkpoint, recipe="atto", img_size=cfg.img_size, workers=0,
                train_subset=cfg.train_subset, val_subset=cfg.val_subset,
                max_steps_per_epoch=cfg.max_steps_per_epoch, seed=seed, progress=cfg.progress,
                **recipe)


def run_demo(cfg: DemoConfig) -> dict:
    """Pretrain once, fine-tune both arms for every seed, compare; returns the results dict
    also written to ``OUTPUT/report/metrics.json``."""
    import torch

    from ..recipes.pretrain import PretrainConfig, pretrain

    if cfg.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {cfg.seeds}")
    load_at_start = load_average()
    threads = pick_threads(cfg.threads)
    torch.set_num_threads(threads)
    out = fresh_output(cfg.output)
    report = out / "report"
    report.mkdir()
    arch = _arch(cfg)
    steps = 2 + 2 * cfg.seeds
    t0 = time.time()

    say(f"using {threads} CPU thread(s) for torch" if not torch.cuda.is_available()
        else f"device: {torch.cuda.get_device_name()}")
    say(f"data: {_describe(cfg.data)}")
    say(f"[1/{steps}] FCMAE pretraining: depths {arch['depths']}, dims {arch['dims']}, "
        f"{cfg.img_size} px, patch 8, mask ratio {cfg.mask_ratio}, {cfg.pretrain_epochs} epochs")
    t = time.time()
    pre = pretrain(PretrainConfig(**pretrain_kwargs(cfg, cfg.data, str(out / "pretrain")),
                                  **monitor_kwargs(cfg)))
    pretrain_time = time.time() - t
    runs = _finetune_arms(cfg, out, str(out / "pretrain" / "encoder.safetensors"), steps)

    results = summarise(cfg, pre, pretrain_time, runs, time.time() - t0)
    results["machine"] = dict(torch_threads=threads, load_average_at_start=load_at_start,
                              load_average_at_end=load_average(),
                              device="cuda" if torch.cuda.is_available() else "cpu")
    _write_report(report, out, results, runs)
    table = format_table(results)
    (report / "table.md").write_text(table + "\n")
    say(table)
    say(f"report: {report}")
    return results


def _finetune_arms(cfg: DemoConfig, out: Path, encoder: str, steps: int) -> dict:
    """Both arms for every seed, side by side where the machine allows (one torch thread per
    run then); ``{arm: [run, ...]}`` sorted by seed."""
    jobs = pick_jobs(cfg.jobs)
    side_by_side = jobs > 1
    arm_of, todo = {}, []
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        for name, ckpt, folder in ((ARMS[0], encoder, "finetune_pretrained"),
                                   (ARMS[1], None, "finetune_scratch")):
            kwargs = finetune_kwargs(cfg, cfg.data, str(out / f"{folder}_seed{seed}"), seed,
                                     ckpt)
            if side_by_side:
                kwargs["progress"] = False  # interleaved bars from several runs are noise
            job = Job(f"{name}, seed {seed}", f"{__name__}:finetune_job", dict(config=kwargs),
                      threads=1 if side_by_side else None)
            arm_of[job.name] = (name, seed)
            todo.append(job)
    say(f"[2/{steps}] fine-tuning, {cfg.seeds} seed(s) x 2 arms, "
        f"{todo[0].kwargs['config']['epochs']} epochs on {cfg.train_subset or 'all'} labelled "
        f"images" + (f", {jobs} runs side by side (1 torch thread each)" if side_by_side else ""))
    finished = iter(range(3, steps + 1))

    def report(job: Job, record: dict, records: dict) -> None:
        if "error" not in record:
            say(f"[{next(finished)}/{steps}] {job.name}: top-1 {record['best_top1']:.2f}% "
                f"({record['seconds']:.0f} s)")

    records = run_jobs(todo, jobs, on_done=report)
    runs: dict[str, list[dict]] = {name: [] for name in ARMS}
    for job in todo:
        name, seed = arm_of[job.name]
        record = dict(records[job.name])
        seconds = record.pop("seconds")
        runs[name].append(dict(seed=seed, summary=record, time_s=seconds))
    return runs


def finetune_job(config: dict) -> dict:
    """One fine-tuning run, in this process or a child: its summary, less the model objects
    (which stay in the process that trained them)."""
    from ..recipes.finetune import FinetuneConfig, finetune

    summary = finetune(FinetuneConfig(**config))
    return {k: v for k, v in summary.items() if k not in ("model", "ema")}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(cfg: DemoConfig, pre: dict, pretrain_time: float, runs: dict,
              total: float) -> dict:
    """Per-arm mean ± std, the paired per-seed gains, and the verdict against the spread."""
    rows = []
    for name, seed_runs in runs.items():
        top1 = [r["summary"]["best_top1"] for r in seed_runs]
        final = [(r["summary"]["final"] or {}).get("val_top1") for r in seed_runs]
        ft = [r["time_s"] for r in seed_runs]
        m, s = mean_std(top1)
        rows.append(dict(run=name, top1=m, top1_std=s, seeds=[r["seed"] for r in seed_runs],
                         top1_per_seed=top1, final_top1_per_seed=final,
                         best_epoch_per_seed=[r["summary"]["best_epoch"] for r in seed_runs],
                         finetune_time_s=statistics.fmean(ft), finetune_time_total_s=sum(ft)))
    pretrained, scratch = rows
    gains = [a - b for a, b in zip(pretrained["top1_per_seed"], scratch["top1_per_seed"])]
    gain, gain_std = mean_std(gains)
    spread = max(pretrained["top1_std"], scratch["top1_std"])
    first = runs[ARMS[0]][0]["summary"]
    return dict(
        config=dict(data=_describe(cfg.data), depths=list(cfg.depths), dims=list(cfg.dims),
                    img_size=cfg.img_size, stem_stride=1, patch_size=8,
                    mask_ratio=cfg.mask_ratio, pretrain_epochs=cfg.pretrain_epochs,
                    finetune_epochs=first["epochs"], seeds=cfg.seeds,
                    finetune_recipe={name: finetune_kwargs(cfg, cfg.data, "", 0, ckpt)
                                     for name, ckpt in zip(ARMS, ("encoder", None))},
                    finetune_images=cfg.train_subset or "all",
                    val_images=cfg.val_subset or _count_test(cfg.data), quick=cfg.quick),
        pretrain=dict(time_s=pretrain_time, last_loss=pre.get("last_loss"),
                      steps=pre.get("global_step"),
                      probes=pretrain_probes(Path(pre["output"])) if "output" in pre else []),
        runs=rows, winner=max(rows, key=lambda r: r["top1"])["run"],
        top1_gain=gain, top1_gain_std=gain_std, gains_per_seed=gains, seed_spread=spread,
        gain_exceeds_spread=abs(gain) > spread,
        same_sign_every_seed=all(g > 0 for g in gains) or all(g < 0 for g in gains),
        total_time_s=total)


def format_table(results: dict) -> str:
    c = results["config"]
    n = c["seeds"]
    lines = [f"ConvNeXt V2 depths {tuple(c['depths'])} dims {tuple(c['dims'])}, {c['img_size']} px "
             f"gray, stem stride 1 (mask patch 8 px); {c['data']}: FCMAE "
             f"{c['pretrain_epochs']} epochs on the training images (no labels), fine-tuning "
             f"{c['finetune_epochs']} epochs on {c['finetune_images']} labelled ones, "
             f"{n} seed(s) per arm, top-1 on the {c['val_images']} test images", "",
             f"| run | top-1 (%), mean ± std over {n} seeds | per seed | "
             f"fine-tune time per run (s) |",
             "|---|---|---|---|"]
    for r in results["runs"]:
        per = " / ".join(f"{v:.2f}" for v in r["top1_per_seed"])
        lines.append(f"| {r['run']} | {r['top1']:.2f} ± {r['top1_std']:.2f} | {per} | "
                     f"{r['finetune_time_s']:.0f} |")
    gain, spread = results["top1_gain"], results["seed_spread"]
    per = ", ".join(f"{g:+.2f}" for g in results["gains_per_seed"])
    verdict = ("exceeds" if results["gain_exceeds_spread"] else "does not exceed")
    lines += ["", f"FCMAE gain: {gain:+.2f} ± {results['top1_gain_std']:.2f} points (per seed: "
                  f"{per}); it {verdict} the seed spread (the larger std of the two arms, "
                  f"{spread:.2f})"
                  + ("; same sign on every seed" if results["same_sign_every_seed"] and n > 1
                     else ""),
              f"FCMAE pretraining: {results['pretrain']['time_s']:.0f} s; whole demo "
              f"{results['total_time_s']:.0f} s"]
    probes = results["pretrain"].get("probes") or []
    if len(probes) >= 2:
        start, end = probes[0], probes[-1]
        lines.append(f"Encoder probes during pretraining (k-NN k=20 on {end['knn_queries']} "
                     f"test images): top-1 {start['knn_top1']:.1f}% at initialisation -> "
                     f"{end['knn_top1']:.1f}% at epoch {end['epoch']}; feature collapse "
                     f"(mean cosine distance) {start['collapse_mean']:.3f} -> "
                     f"{end['collapse_mean']:.3f}; {sum(p['monitor_s'] for p in probes):.0f} s "
                     f"for {len(probes)} probes")
    return "\n".join(lines)


def _write_report(report: Path, out: Path, results: dict, runs: dict) -> None:
    import shutil

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (report / "metrics.json").write_text(json.dumps(results, indent=2))
    for src, dst in (("pretrain/reconstruction.png", "reconstruction.png"),
                     ("pretrain/loss_curve.png", "pretrain_loss.png"),
                     ("pretrain/monitor.png", "pretrain_monitor.png")):
        if (out / src).is_file():
            shutil.copyfile(out / src, report / dst)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, seed_runs), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        for j, r in enumerate(seed_runs):
            h = r["summary"]["history"]
            ep = [x["epoch"] for x in h]
            label = name if j == 0 else None
            axes[0].plot(ep, [x["val_top1"] for x in h], marker="o", color=color, label=label,
                         alpha=0.8)
            axes[1].plot(ep, [x["train_loss"] for x in h], marker="o", color=color,
                         label=f"{name} train" if j == 0 else None, alpha=0.8)
            axes[1].plot(ep, [x["val_loss"] for x in h], ls="--", marker=".", color=color,
                         label=f"{name} test" if j == 0 else None, alpha=0.8)
    axes[0].set(xlabel="epoch", ylabel="test top-1 (%)", title="accuracy (one line per seed)")
    axes[1].set(xlabel="epoch", ylabel="loss", title="loss")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "finetune_curves.png", dpi=100)
    plt.close(fig)


def _count_test(data: str) -> int:
    from ..data import build_dataset
    return len(build_dataset(data, "val"))


def _describe(data: str) -> str:
    from ..data import describe_source
    return describe_source(data)
