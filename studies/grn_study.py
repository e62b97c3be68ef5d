"""GRN study: does GRN keep FCMAE-pretrained features from collapsing, and does it help accuracy?

A small ConvNeXt V1-style network (no GRN, layer scale 1e-6) and the same-size V2 network (GRN,
no layer scale) are each
  1. pretrained with FCMAE on the built-in Fashion-MNIST subset (10k train images),
  2. fine-tuned from that encoder,
  3. trained from scratch with the same fine-tuning recipe and budget,
and the feature-collapse curves of every encoder are measured on test images.

    /work/venv/bin/python studies/grn_study.py --output runs/grn_study     (~15-20 min, 2 cores)
    /work/venv/bin/python studies/grn_study.py --quick --output /tmp/grn   (smoke run, ~1-2 min)

Writes under --output: pretrain_{v1,v2}/, finetune_{v1,v2}/, scratch_{v1,v2}/ (the runs' own
files), collapse_{pretrained,trained}_{block,expansion}/ (collapse.json + collapse.png: block outputs
and the 4x-wide MLP activations), 
results.json (every number, command, seed and wall-clock time) and results.md (the table).

`convnextv2 pretrain` and `convnextv2 finetune` have no option for the V1 block (use_grn=False,
layer_scale_init_value=1e-6). Fine-tuning takes it through ``FinetuneConfig.model_kwargs``;
pretraining gets it by wrapping ``convnextv2.models.registry.create_model`` for the duration of the
non-V2 runs (``encoder_block``). Everything else goes through the same code as the CLI commands that
results.json lists.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from convnextv2.cli import main as cli_main
from convnextv2.recipes.finetune import FinetuneConfig, finetune
from convnextv2.recipes.pretrain import PretrainConfig, pretrain

ARCH = dict(model="atto", depths=(1, 1, 4, 1), dims=(16, 32, 64, 128), stem_stride=1, in_chans=1)
IMG_SIZE = 32                      # patch size 8 -> a 4 x 4 mask grid
BLOCKS = {"v1": dict(use_grn=False, layer_scale_init_value=1e-6),
          "v2": dict(use_grn=True, layer_scale_init_value=None),
          # optional control arm: neither GRN nor layer scale (separates the two differences)
          "plain": dict(use_grn=False, layer_scale_init_value=None)}
ARM_NAMES = {"v1": "V1-style (no GRN, layer scale 1e-6)", "v2": "V2 (GRN, no layer scale)",
             "plain": "control (no GRN, no layer scale)"}

FULL = dict(pretrain_epochs=2, finetune_epochs=2, train_subset=5000, collapse_images=64)
QUICK = dict(pretrain_epochs=1, finetune_epochs=1, train_subset=256, collapse_images=8,
             max_steps=3)


@contextlib.contextmanager
def encoder_block(block: dict):
    """Make ``create_model`` (used by the pretraining code) build the given block kind."""
    import convnextv2.models.registry as registry
    original = registry.create_model

    def create_model(name, *args, **kwargs):
        return original(name, *args, **{**kwargs, **block})

    registry.create_model = create_model
    try:
        yield
    finally:
        registry.create_model = original


def arch_flags() -> str:
    return (f"--model {ARCH['model']} --depths {' '.join(map(str, ARCH['depths']))} "
            f"--dims {' '.join(map(str, ARCH['dims']))} --stem-stride {ARCH['stem_stride']} "
            f"--in-chans {ARCH['in_chans']} --img-size {IMG_SIZE}")


def run_pretrain(kind: str, out: Path, budget: dict, seed: int, lr: float) -> dict:
    cfg = PretrainConfig(model=ARCH["model"], data="builtin", output=str(out),
                         epochs=budget["pretrain_epochs"], batch_size=128, img_size=IMG_SIZE,
                         in_chans=ARCH["in_chans"], stem_stride=ARCH["stem_stride"],
                         depths=ARCH["depths"], dims=ARCH["dims"], decoder_dim=128, lr=lr,
                         warmup_epochs=0.25, workers=0, seed=seed, recon_every=0,
                         max_steps=budget.get("max_steps"), progress=sys.stderr.isatty())
    command = (f"convnextv2 pretrain {arch_flags()} --data builtin --epochs {cfg.epochs} "
               f"--batch-size 128 --decoder-dim 128 --lr {lr} --warmup-epochs 0.25 --workers 0 "
               f"--recon-every 0 --seed {seed} --output {out}")
    if kind != "v2":
        command += f"   # plus {BLOCKS[kind]} (no CLI flag yet)"
    t0 = time.time()
    with encoder_block(BLOCKS[kind]) if kind != "v2" else contextlib.nullcontext():
        summary = pretrain(cfg)
    return dict(command=command, seconds=time.time() - t0, last_loss=summary["last_loss"],
                steps=summary["global_step"], fcmae=str(out / "fcmae.safetensors"),
                encoder=str(out / "encoder.safetensors"))


def run_finetune(kind: str, out: Path, budget: dict, seed: int, lr: float,
                 checkpoint: str | None) -> dict:
    """The same recipe for fine-tuning and for training from scratch (only the start differs)."""
    recipe = dict(epochs=budget["finetune_epochs"], batch_size=128, lr=lr, weight_decay=0.05,
                  layer_decay=1.0, drop_path=0.0, smoothing=0.1, mixup=0.0, cutmix=0.0,
                  reprob=0.0, auto_augment="none", crop_scale=(0.6, 1.0), model_ema=False)
    arch = {k: v for k, v in ARCH.items() if k != "model"}
    if checkpoint:
        cfg = FinetuneConfig(model=None, finetune=checkpoint, **recipe)
        start = f"--finetune {checkpoint}"
    else:
        cfg = FinetuneConfig(model=ARCH["model"], model_kwargs={**arch, **BLOCKS[kind]}, **recipe)
        start = f"--model {ARCH['model']} --depths {' '.join(map(str, ARCH['depths']))} " \
                f"--dims {' '.join(map(str, ARCH['dims']))} --stem-stride 1 --in-chans 1"
    cfg.data, cfg.output, cfg.img_size, cfg.seed = "builtin", str(out), IMG_SIZE, seed
    cfg.train_subset, cfg.workers, cfg.progress = budget["train_subset"], 0, sys.stderr.isatty()
    if budget.get("max_steps"):
        cfg.max_steps_per_epoch = budget["max_steps"]
    command = (f"convnextv2 finetune {start} --data builtin --img-size {IMG_SIZE} "
               f"--epochs {cfg.epochs} --batch-size 128 --lr {lr} --weight-decay 0.05 "
               f"--layer-decay 1.0 --drop-path 0 --smoothing 0.1 --mixup 0 --cutmix 0 --reprob 0 "
               f"--aa none --crop-scale 0.6 1.0 --no-model-ema --train-subset {cfg.train_subset} "
               f"--seed {seed} --output {out}")
    if kind != "v2" and not checkpoint:
        command += f"   # plus {BLOCKS[kind]} (no CLI flag yet)"
    t0 = time.time()
    summary = finetune(cfg)
    final = summary["final"] or {}
    return dict(command=command, seconds=time.time() - t0, best_top1=summary["best_top1"],
                final_top1=final.get("val_top1"), final_train_loss=final.get("train_loss"),
                best=summary["best"], last=summary["last"])


def run_collapse(checkpoints: list[str], labels: list[str], out: Path, images: int,
                 seed: int, site: str) -> dict:
    argv = ["analyze", "collapse", "--checkpoint", *checkpoints, "--labels", *labels,
            "--data", "builtin", "--images", str(images), "--img-size", str(IMG_SIZE),
            "--site", site, "--seed", str(seed), "--output", str(out)]
    t0 = time.time()
    if cli_main(argv) != 0:
        raise RuntimeError(f"convnextv2 {' '.join(argv)} failed")
    data = json.loads((out / "collapse.json").read_text())
    return dict(command="convnextv2 " + " ".join(f'"{a}"' if "," in a or " " in a else a
                                                 for a in argv),
                seconds=time.time() - t0,
                curves={m["label"]: dict(mean=m["mean_score"], scores=m["scores"])
                        for m in data["models"]},
                png=str(out / "collapse.png"))


def random_spec(kind: str) -> str:
    block = BLOCKS[kind]
    extra = "".join(f",{k}={v}" for k, v in block.items() if v is not None)
    return (f"random:{ARCH['model']},depths={ARCH['depths']},dims={ARCH['dims']},"
            f"stem_stride=1,in_chans=1{extra}").replace(" ", "")


def pick_threads(requested: int) -> int:
    """0 = auto: all cores, or 1 when the machine is already busy (OpenMP threads that fight
    other processes for 2 cores made training ~3x slower than one thread, measured here)."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] >= cores * 0.75 if hasattr(os, "getloadavg") else False
    return 1 if busy else cores


def write_table(results: dict, path: Path) -> str:
    runs, col = results["runs"], results["collapse"]
    rows = ["| model | FCMAE loss (last step) | fine-tuned top-1 | from scratch top-1 |",
            "|---|---|---|---|"]
    names = [(kind, ARM_NAMES[kind]) for kind in results["arms"]]
    for kind, name in names:
        rows.append(f"| {name} | {runs[f'pretrain_{kind}']['last_loss']:.4f} | "
                    f"{runs[f'finetune_{kind}']['best_top1']:.2f}% | "
                    f"{runs[f'scratch_{kind}']['best_top1']:.2f}% |")
    rows += ["", "mean feature cosine distance over the blocks (higher = more diverse):", "",
             "| model | site | random init | FCMAE | fine-tuned | scratch |", "|---|---|---|---|---|---|"]
    for kind, name in names:
        for site in ("block", "expansion"):
            cp, ct = col[f"pretrained_{site}"]["curves"], col[f"trained_{site}"]["curves"]
            rows.append(f"| {name} | {site} | {cp[f'{kind} random init']['mean']:.3f} | "
                        f"{cp[f'{kind} FCMAE']['mean']:.3f} | {ct[f'{kind} fine-tuned']['mean']:.3f} | "
                        f"{ct[f'{kind} scratch']['mean']:.3f} |")
    table = "\n".join(rows)
    times = "\n".join(f"- {name}: {r['seconds']:.0f} s" for name, r in runs.items())
    path.write_text(f"{table}\n\nwall-clock per run ({results['threads']} torch thread(s)):\n"
                    f"{times}\n- total: {results['total_seconds']:.0f} s\n")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/grn_study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny budget, to check that it runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: auto)")
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    p.add_argument("--finetune-lr", type=float, default=2e-3)
    p.add_argument("--arms", nargs="+", default=["v1", "v2"], choices=list(BLOCKS),
                   help="block kinds to compare (default v1 v2; 'plain' = no GRN, no layer scale)")
    args = p.parse_args(argv)

    budget = QUICK if args.quick else FULL
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(arch=ARCH, img_size=IMG_SIZE, blocks=BLOCKS, arms=args.arms, budget=budget,
                   seed=args.seed,
                   threads=threads, pretrain_lr=args.pretrain_lr, finetune_lr=args.finetune_lr,
                   torch=torch.__version__, runs={})
    t_start = time.time()
    runs = results["runs"]
    arms = args.arms
    for kind in arms:
        print(f"== FCMAE pretraining, {kind}", flush=True)
        runs[f"pretrain_{kind}"] = run_pretrain(kind, out / f"pretrain_{kind}", budget,
                                                args.seed, args.pretrain_lr)
    for kind in arms:
        print(f"== fine-tuning the FCMAE encoder, {kind}", flush=True)
        runs[f"finetune_{kind}"] = run_finetune(kind, out / f"finetune_{kind}", budget, args.seed,
                                                args.finetune_lr, runs[f"pretrain_{kind}"]["encoder"])
        print(f"== training from scratch, {kind}", flush=True)
        runs[f"scratch_{kind}"] = run_finetune(kind, out / f"scratch_{kind}", budget, args.seed,
                                               args.finetune_lr, None)
    pretrained = ([runs[f"pretrain_{k}"]["fcmae"] for k in arms] + [random_spec(k) for k in arms],
                  [f"{k} FCMAE" for k in arms] + [f"{k} random init" for k in arms])
    trained = ([runs[f"finetune_{k}"]["last"] for k in arms] + [runs[f"scratch_{k}"]["last"] for k in arms],
               [f"{k} fine-tuned" for k in arms] + [f"{k} scratch" for k in arms])
    results["collapse"] = {}
    for site in ("block", "expansion"):
        for group, (ckpts, labels) in (("pretrained", pretrained), ("trained", trained)):
            print(f"== feature collapse: {group} encoders, {site} site", flush=True)
            results["collapse"][f"{group}_{site}"] = run_collapse(
                ckpts, labels, out / f"collapse_{group}_{site}", budget["collapse_images"],
                args.seed, site)
    results["total_seconds"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(write_table(results, out / "results.md"))
    print(f"total {results['total_seconds']:.0f} s; wrote {out / 'results.json'} and "
          f"{out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
