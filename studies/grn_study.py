"""GRN study: the paper's Table 2(f) arms and Fig. 4 collapse curves, on Fashion-MNIST.

The paper (ConvNeXt-B, 800 FCMAE epochs on ImageNet) reports two things about GRN:
- Fig. 4: after FCMAE, a ConvNeXt V1 collapses (its MLP-expansion channels become alike: low
  pairwise cosine distance) while V2 keeps diverse features;
- Table 2(f): GRN matters in both phases: 84.6 with GRN in pretraining and fine-tuning, 78.8
  when the GRN of a pretrained V2 is removed for fine-tuning, 80.6 when a fresh GRN is added
  only at fine-tuning, 83.7 with no GRN anywhere (the V1 baseline).

This script runs those four arms on a small ConvNeXt (32 px, stem stride 1, 8 px mask patches),
each at the same fine-tuning budget, plus V1 and V2 trained from scratch with that budget, for
several seeds (mean ± std), and measures the collapse curves of the V1 and V2 encoders after
FCMAE (and at random init) on the same test images, at the block output and at the expansion.

Per seed: FCMAE pretraining of a V2 encoder and of a no-GRN encoder (``--no-grn-block``: ``v1``,
the V1 block with layer scale 1e-6 as in the paper's baseline, or ``plain``: neither GRN nor
layer scale); then six fine-tuning runs:

    arm             pretrained encoder        fine-tuned model
    grn/grn         V2                        V2
    grn/none        V2, GRN weights dropped   no-GRN block (layer scale, if any, set to 1)
    none/grn        no-GRN                    V2 with a fresh GRN (gamma = beta = 0)
    none/none       no-GRN                    no-GRN block
    scratch V2      -                         V2
    scratch no-GRN  -                         no-GRN block

Moving an encoder between blocks is explicit (``convnextv2.checkpoint.convert_blocks``), and
the moved keys are listed in results.json: dropping GRN removes ``*.grn.gamma``/``*.grn.beta``;
adding GRN creates them as zeros, as the model's own init does (so the new GRN starts as the
identity); a layer scale that the target block lacks is folded into ``pwconv2``
(``s * (W x + b) = (s W) x + s b``, exact); a layer scale the source lacks is created as ones
(the identity). Only GRN's presence changes at the phase boundary: the other conversions leave
the network's function as it was.

Budgets (``--budget``): ``smoke`` (every arm end to end in seconds, for CI), ``cpu`` (32 min
measured on 2 busy CPU cores), ``gpu`` (about 2.5 minutes on one H100: tiny models are launch-bound,
so ``--jobs`` runs several training processes side by side on the GPU). A deadline stops
launching, then kills, runs that would overrun; the table then gives n per cell.

Data: the full Fashion-MNIST (60k/10k) from ``/usr/share/datasets/fashion-mnist`` when it is
installed (or ``--data PATH``), else the built-in 10k/2k subset; budgets smaller than the data
use a seeded subset, and the output says which.

    PYTHONPATH=src .venv/bin/python studies/grn_study.py --budget smoke --output /tmp/grn
    PYTHONPATH=src nice -n 19 .venv/bin/python studies/grn_study.py --budget cpu --output runs/grn
    bash studies/run_grn_gpu.sh          # the GPU run, writes under $OUT

Writes under --output: results.json (every number, run, key conversion, command, timing),
results.md (the tables), collapse_expansion.png and collapse_block.png. The training runs
themselves go to --work (default OUTPUT/runs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from convnextv2.demos.runner import Job, load_average, run_jobs, say
from convnextv2.training.output import fresh_output  # a new study never overwrites an old one

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMG_SIZE = 32

ARCH = dict(depths=(1, 1, 4, 1), dims=(16, 32, 64, 128), stem_stride=1, in_chans=1)
SMOKE_ARCH = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), stem_stride=1, in_chans=1)

BLOCKS = {"v2": dict(use_grn=True, layer_scale_init_value=None),
          "v1": dict(use_grn=False, layer_scale_init_value=1e-6),
          "plain": dict(use_grn=False, layer_scale_init_value=None)}

# fine-tuning arms: (name, pretrained encoder kind or None, fine-tuned block kind); "nogrn" is
# resolved to --no-grn-block
ARMS = (("grn/grn", "v2", "v2"), ("grn/none", "v2", "nogrn"), ("none/grn", "nogrn", "v2"),
        ("none/none", "nogrn", "nogrn"), ("scratch V2", None, "v2"),
        ("scratch no-GRN", None, "nogrn"))
# the paper's numbers (ConvNeXt-B, 800-epoch FCMAE, ImageNet-1K top-1): Table 2(f), Table 3
PAPER = {"grn/grn": "84.6", "grn/none": "78.8", "none/grn": "80.6",
         "none/none": "83.7 (baseline)", "scratch V2": "84.3 (V2 supervised)",
         "scratch no-GRN": "83.8 (V1 supervised)"}

# The fine-tuning recipe is the same for every arm and budget apart from its length: the
# small-image preset the demo uses (RandomCrop with padding 4, no RandAugment, mixup, cutmix,
# erasing or EMA, smoothing 0.1), without layer-wise lr decay so that no arm gets a
# pretrained-only device.
FINETUNE = dict(lr=2e-3, min_lr=1e-6, warmup_epochs=0.5, weight_decay=0.05, layer_decay=1.0,
                drop_path=0.0, smoothing=0.1, mixup=0.0, cutmix=0.0, reprob=0.0,
                auto_augment="none", model_ema=False)
PRETRAIN = dict(mask_ratio=0.6, decoder_dim=128, warmup_epochs=0.5, backend="sparse")

BUDGETS = {
    # every arm end to end on a few batches (CI)
    "smoke": dict(arch=SMOKE_ARCH, seeds=2, pretrain_images=256, test_images=64,
                  finetune_images=128, pretrain_epochs=1, finetune_epochs=1, pretrain_batch=32,
                  finetune_batch=32, pretrain_lr=2e-3, collapse_images=8, max_steps=2, jobs=1,
                  workers=0, deadline_s=None),
    # 32 min measured on the shared 2-core machine (load 2-6), two runs side by side
    "cpu": dict(arch=ARCH, seeds=3, pretrain_images=20000, test_images=5000,
                finetune_images=5000, pretrain_epochs=2, finetune_epochs=3, pretrain_batch=128,
                finetune_batch=128, pretrain_lr=1.5e-3, collapse_images=128, max_steps=None,
                jobs=2, workers=0, deadline_s=None),
    # one H100, about 150 s of training in 6 processes sharing the GPU
    "gpu": dict(arch=ARCH, seeds=3, pretrain_images=None, test_images=None,
                finetune_images=10000, pretrain_epochs=4, finetune_epochs=4, pretrain_batch=256,
                finetune_batch=128, pretrain_lr=2e-3, collapse_images=256, max_steps=None,
                jobs=6, workers=2, deadline_s=130),
}


# -- data ------------------------------------------------------------------------------------
def default_data() -> str:
    return str(FASHION_MNIST) if FASHION_MNIST.is_dir() else "builtin"


def describe_data(data: str) -> str:
    n_train, n_test = _count(data, "train"), _count(data, "val")
    if data == "builtin":
        return f"built-in Fashion-MNIST subset ({n_train} train / {n_test} test)"
    full = " (the full Fashion-MNIST)" if (n_train, n_test) == (60000, 10000) else ""
    return f"{data}: {n_train} train / {n_test} test images{full}"


def _count(data: str, split: str) -> int:
    """Number of images in a split; read from the IDX header when there is one (the full
    Fashion-MNIST takes a second to decompress, and this is called after every run)."""
    import gzip

    from convnextv2.data import build_dataset, find_idx_pair, is_idx_folder
    if data != "builtin" and is_idx_folder(Path(data)):
        images, _ = find_idx_pair(Path(data), split)
        with (gzip.open(images) if images.suffix == ".gz" else open(images, "rb")) as f:
            return int.from_bytes(f.read(8)[4:8], "big")
    return len(build_dataset(data, split))


def subset_folder(data: str, folder: Path, train: int | None, test: int | None,
                  seed: int = 0) -> str:
    """``data`` itself when no subset is asked for or it is no larger; else an IDX folder of
    ``train`` training and ``test`` test images drawn with ``seed`` (the same for every arm
    and seed of the study, so all runs see the same images)."""
    import numpy as np

    from convnextv2.data import build_dataset, write_idx

    tr, te = build_dataset(data, "train"), build_dataset(data, "val")
    if (train is None or train >= len(tr)) and (test is None or test >= len(te)):
        return data
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for ds, n, stem in ((tr, train, "train"), (te, test, "t10k")):
        keep = np.sort(rng.permutation(len(ds.images))[:n or len(ds.images)])
        write_idx(folder / f"{stem}-images-idx3-ubyte", np.asarray(ds.images)[keep])
        write_idx(folder / f"{stem}-labels-idx1-ubyte",
                  np.asarray(ds.targets, dtype=np.uint8)[keep])
    return str(folder)


# -- one training run (a job of the runner: in this process or in a child) -------------------
def run_job(kind: str, config: dict, convert: str | None = None,
            target_block: dict | None = None) -> dict:
    """One pretraining or fine-tuning run of the study; returns its record. A fine-tuning run
    from an encoder of another block kind first converts it (``convert``: the encoder file,
    ``target_block``: the block constructor arguments)."""
    if kind == "pretrain":
        from convnextv2.recipes.pretrain import PretrainConfig, pretrain
        s = pretrain(PretrainConfig(**config))
        return dict(last_loss=s.get("last_loss"), steps=s.get("global_step"),
                    encoder=str(Path(config["output"]) / "encoder.safetensors"))
    from convnextv2.checkpoint import convert_blocks_file
    from convnextv2.recipes.finetune import FinetuneConfig, finetune
    config = dict(config)
    conversion = None
    if convert:
        out = Path(config["output"])
        out.mkdir(parents=True, exist_ok=True)
        converted = str(out.parent / f"{out.name}_encoder.safetensors")
        conversion = convert_blocks_file(convert, converted, **target_block)
        config["finetune"] = converted
    s = finetune(FinetuneConfig(**config))
    final = s["final"] or {}
    return dict(best_top1=s["best_top1"], final_top1=final.get("val_top1"),
                best_epoch=s["best_epoch"], steps=s.get("global_step"), conversion=conversion)


# -- the study's jobs and their scheduling ---------------------------------------------------
def plan(args, budget: dict, data: str, work: Path) -> list[dict]:
    """Every job of the study, in launch-priority order, with its dependencies."""
    arch = budget["arch"]
    nogrn = args.no_grn_block
    kinds = {"v2": "v2", "nogrn": nogrn}
    common = dict(data=data, img_size=IMG_SIZE, seed=None, progress=False,
                  workers=budget["workers"], device=args.device)
    jobs = []
    for i in range(args.seeds):
        seed = args.seed + i
        for kind in ("v2", nogrn):
            out = work / f"seed{seed}" / f"pretrain_{kind}"
            cfg = dict(common, model="convnextv2_atto", output=str(out), seed=seed,
                       epochs=budget["pretrain_epochs"], batch_size=budget["pretrain_batch"],
                       lr=budget["pretrain_lr"], depths=arch["depths"], dims=arch["dims"],
                       in_chans=arch["in_chans"], stem_stride=arch["stem_stride"],
                       recon_every=0, max_steps=(budget["max_steps"] * budget["pretrain_epochs"]
                                                 if budget["max_steps"] else None),
                       model_kwargs=dict(BLOCKS[kind]), **PRETRAIN)
            jobs.append(dict(name=f"pretrain {kind} seed {seed}", kind="pretrain", seed=seed,
                             block=kind, config=cfg, deps=[]))
    for i in range(args.seeds):
        seed = args.seed + i
        for arm, pre, block in ARMS:
            pre_kind, ft_kind = kinds.get(pre), kinds[block]
            out = work / f"seed{seed}" / ("ft_" + arm.replace("/", "_").replace(" ", "_"))
            model_kwargs = {**{k: v for k, v in arch.items()}, **BLOCKS[ft_kind]}
            cfg = dict(common, model=None, model_kwargs=model_kwargs, output=str(out),
                       seed=seed, recipe="atto", epochs=budget["finetune_epochs"],
                       batch_size=budget["finetune_batch"],
                       train_subset=budget["finetune_images"], max_steps_per_epoch=
                       budget["max_steps"], **FINETUNE)
            job = dict(name=f"{arm} seed {seed}", kind="finetune", seed=seed, arm=arm,
                       config=cfg, deps=[], target_block=BLOCKS[ft_kind])
            if pre_kind:
                job["deps"] = [f"pretrain {pre_kind} seed {seed}"]
                job["convert"] = str(work / f"seed{seed}" / f"pretrain_{pre_kind}" /
                                     "encoder.safetensors")
            jobs.append(job)
    return jobs


def runner_jobs(plan: list[dict], threads: int) -> list[Job]:
    """The planned runs as jobs of the shared runner, each calling ``run_job``."""
    target = f"{Path(__file__).resolve()}:run_job"
    return [Job(p["name"], target, dict(kind=p["kind"], config=p["config"],
                                        convert=p.get("convert"),
                                        target_block=p.get("target_block")),
                deps=tuple(p["deps"]), threads=threads) for p in plan]


# -- feature collapse after pretraining ------------------------------------------------------
def collapse_curves(records: dict, jobs: list[dict], data: str, budget: dict, seed: int,
                    device: str = "cpu") -> dict:
    """Diversity per block for every FCMAE encoder and a random init of each block kind,
    at both sites, on the same ``collapse_images`` test images (on ``device``: the scheduler
    waits meanwhile, so a GPU keeps the pause to a second or two)."""
    import torch

    from convnextv2.analysis.collapse import collapse_profile
    from convnextv2.checkpoint import load_model
    from convnextv2.data import build_dataset, eval_transform
    from convnextv2.models.model import ConvNeXtV2

    torch.set_num_threads(min(4, os.cpu_count() or 1))  # the training processes need the rest
    ds = build_dataset(data, "val", eval_transform(IMG_SIZE, 1))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    images = torch.stack([ds[i][0] for i in order[:budget["collapse_images"]].tolist()])
    curves: dict = {}
    for job in jobs:
        if job["kind"] != "pretrain" or "error" in records.get(job["name"], {"error": 1}):
            continue
        kind, s = job["block"], job["seed"]
        models = {f"{kind} FCMAE": load_model(records[job["name"]]["encoder"])}
        torch.manual_seed(s)
        models[f"{kind} random init"] = ConvNeXtV2(num_classes=10, **budget["arch"],
                                                   **BLOCKS[kind])
        for label, model in models.items():
            model.to(device)
            for site in ("block", "expansion"):
                prof = collapse_profile(model, images, batch_size=64, site=site)
                entry = curves.setdefault(site, {}).setdefault(label, dict(
                    layers=prof["layers"], index=prof["index"], seeds=[], scores=[]))
                entry["seeds"].append(s)
                entry["scores"].append(prof["scores"])
    for site in curves.values():
        for entry in site.values():
            per_block = list(zip(*entry["scores"]))
            entry["mean"] = [statistics.fmean(v) for v in per_block]
            entry["std"] = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_block]
            means = [statistics.fmean(v) for v in entry["scores"]]  # over blocks, per seed
            entry["block_mean"], entry["block_mean_std"] = (
                statistics.fmean(means), statistics.stdev(means) if len(means) > 1 else 0.0)
    return dict(images=int(len(images)), image_seed=seed, split="test", curves=curves)


def plot_collapse(collapse: dict, output: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"v2": "tab:blue", "v1": "tab:red", "plain": "tab:green"}
    for site, entries in collapse["curves"].items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for label, e in sorted(entries.items()):
            kind = label.split()[0]
            style = dict(ls="--", alpha=0.6) if "random" in label else dict(ls="-", marker="o")
            lo = [m - s for m, s in zip(e["mean"], e["std"])]
            hi = [m + s for m, s in zip(e["mean"], e["std"])]
            ax.plot(e["index"], e["mean"], color=colors.get(kind), markersize=3,
                    label=f"{label} (n={len(e['seeds'])})", **style)
            ax.fill_between(e["index"], lo, hi, color=colors.get(kind),
                            alpha=0.07 if "random" in label else 0.2)
        top = max(max(h for h in e["mean"]) for e in entries.values())
        ax.set_ylim(0, max(0.55, top + 0.05))  # from 0, as the paper's Fig. 4: collapse -> 0
        ax.set_xlabel("normalised block index (block k / (K-1))")
        ax.set_ylabel("feature cosine distance (higher = more diverse)")
        ax.set_title(f"Feature collapse after FCMAE, {site} site, "
                     f"{collapse['images']} test images, mean ± std over seeds", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = output / f"collapse_{site}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(str(path))
    return written


# -- tables ----------------------------------------------------------------------------------
def _ms(values: list[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summarise(records: dict, jobs: list[dict], nogrn: str) -> dict:
    arms = {}
    for arm, pre, block in ARMS:
        done = [records[j["name"]] for j in jobs
                if j.get("arm") == arm and "error" not in records.get(j["name"], {"error": 1})]
        top1 = [r["best_top1"] for r in done]
        arms[arm] = dict(top1=top1, seeds=[j["seed"] for j in jobs if j.get("arm") == arm and
                                           "error" not in records.get(j["name"], {"error": 1})],
                         final_top1=[r["final_top1"] for r in done],
                         mean=statistics.fmean(top1) if top1 else None,
                         std=statistics.stdev(top1) if len(top1) > 1 else (0.0 if top1 else None))
    pre = {}
    for kind in ("v2", nogrn):
        done = [records[j["name"]] for j in jobs if j["kind"] == "pretrain" and j["block"] == kind
                and "error" not in records.get(j["name"], {"error": 1})]
        pre[kind] = dict(last_loss=[r["last_loss"] for r in done],
                         seconds=[r["seconds"] for r in done])
    return dict(arms=arms, pretrain=pre)


def format_tables(results: dict) -> str:
    nogrn = results["no_grn_block"]
    name = {"v1": "V1 block (layer scale 1e-6)", "plain": "plain block (no layer scale)"}[nogrn]
    arms, base = results["summary"]["arms"], results["summary"]["arms"]["none/none"]
    rows = [f"Fine-tuned top-1 (%) on {results['test_images']} test images, mean ± std over "
            f"seeds (n = runs that finished); no-GRN = {name}", "",
            "| GRN in pretraining | GRN in fine-tuning | top-1 (%) | n | vs none/none | "
            "paper, ConvNeXt-B IN-1K |", "|---|---|---|---|---|---|"]
    label = {"grn/grn": ("yes", "yes"), "grn/none": ("yes", "removed"),
             "none/grn": ("no", "added (fresh)"), "none/none": ("no", "no"),
             "scratch V2": ("no pretraining", "yes (V2)"),
             "scratch no-GRN": ("no pretraining", "no")}
    for arm, *_ in ARMS:
        a = arms[arm]
        diff = ""
        if a["top1"] and base["top1"] and arm != "none/none":
            d = [x - y for x, y in _paired(a, base)]
            diff = _ms(d) + " (paired)" if d else ""
        rows.append(f"| {label[arm][0]} | {label[arm][1]} | {_ms(a['top1'])} | {len(a['top1'])} "
                    f"| {diff} | {PAPER[arm]} |")
    pre = results["summary"]["pretrain"]
    rows += ["", "FCMAE loss at the last step: " + "; ".join(
        f"{k}: {_ms(v['last_loss'], 4)}" for k, v in pre.items())]
    col = results.get("collapse")
    if col and col["curves"]:
        rows += ["", f"Feature cosine distance after FCMAE, averaged over the blocks, mean ± std "
                     f"over seeds ({col['images']} test images; higher = more diverse):", "",
                 "| encoder | block site | expansion site |", "|---|---|---|"]
        labels = sorted({lab for site in col["curves"].values() for lab in site})
        for lab in labels:
            cells = []
            for site in ("block", "expansion"):
                e = col["curves"].get(site, {}).get(lab)
                cells.append(f"{e['block_mean']:.3f} ± {e['block_mean_std']:.3f}" if e else "n/a")
            rows.append(f"| {lab} | {cells[0]} | {cells[1]} |")
        rows += ["", "Per block, expansion site (mean over seeds, blocks in forward order):", "",
                 "| encoder | per block |", "|---|---|"]
        for lab, e in sorted(col["curves"].get("expansion", {}).items()):
            rows.append(f"| {lab} | {' '.join(f'{m:.3f}' for m in e['mean'])} |")
    return "\n".join(rows)


def _paired(a: dict, b: dict):
    other = dict(zip(b["seeds"], b["top1"]))
    return [(x, other[s]) for s, x in zip(a["seeds"], a["top1"]) if s in other]


# -- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=list(BUDGETS), default="smoke")
    p.add_argument("--data", help="an IDX folder, an ImageFolder tree or 'builtin' (default: "
                                  f"{FASHION_MNIST} if installed, else builtin)")
    p.add_argument("--output", default="runs/grn_study",
                   help="tables and plots; a folder that is not empty is left alone and "
                        "OUTPUT-2, OUTPUT-3, ... is used")
    p.add_argument("--work", help="where the training runs go (default OUTPUT/runs; for the gpu "
                                  "budget a temporary folder, so that OUTPUT holds only the "
                                  "tables and plots)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--seeds", type=int, help="seeds per arm (budget default: 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--jobs", type=int, help="training processes side by side (1: in this "
                                            "process); budget default")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--max-steps", type=int,
                   help="cap every run at this many optimizer steps per epoch (a dry run of a "
                        "budget at a tiny scale; the results then mean nothing)")
    p.add_argument("--deadline", type=float,
                   help="seconds after which no run starts (running ones are killed 25 s later); "
                        "budget default, 0 for none")
    p.add_argument("--no-grn-block", choices=("v1", "plain"), default="v1",
                   help="the block without GRN: v1 (layer scale 1e-6, the paper's baseline) or "
                        "plain (neither GRN nor layer scale)")
    args = p.parse_args(argv)

    budget = dict(BUDGETS[args.budget])
    if args.max_steps is not None:
        if args.max_steps < 1:
            p.error("--max-steps must be >= 1")
        budget.update(max_steps=args.max_steps, test_images=min(budget["test_images"] or 500, 500),
                      collapse_images=min(budget["collapse_images"], 16))
    args.seeds = args.seeds if args.seeds is not None else budget["seeds"]
    jobs_n = args.jobs if args.jobs is not None else budget["jobs"]
    deadline = budget["deadline_s"] if args.deadline is None else (args.deadline or None)
    if args.seeds < 1 or jobs_n < 1 or args.threads < 1:
        p.error("--seeds, --jobs and --threads must be >= 1")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible here")
    data = args.data or default_data()
    if data != "builtin" and not Path(data).is_dir():
        p.error(f"--data {data}: no such folder")

    out = fresh_output(args.output)
    if args.work:
        work = fresh_output(args.work)
    elif args.budget == "gpu":
        import tempfile
        work = Path(tempfile.mkdtemp(prefix="grn_work."))
    else:
        work = out / "runs"
        work.mkdir(parents=True)
    say(f"training runs go to {work}")

    t0 = time.time()
    load0 = load_average()
    source = describe_data(data)
    run_data = subset_folder(data, work / "fashion_subset", budget["pretrain_images"],
                             budget["test_images"])
    used = source if run_data == data else f"{source}, seeded subset: {describe_data(run_data)}"
    say(f"data: {used}")
    say(f"budget {args.budget}: {args.seeds} seeds, {jobs_n} process(es), device "
        f"{args.device}, no-GRN block {args.no_grn_block}")
    jobs = plan(args, budget, run_data, work)

    import torch
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else platform.processor() or platform.machine() or "cpu")
    collapse: dict = {}
    state = dict(final=False)

    def write(records: dict) -> list[str]:
        """results.json and results.md from what has finished so far: rewritten after every
        run, so even a study killed from outside leaves its latest table."""
        results = dict(
            command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            budget=args.budget, budget_values=budget, data=used,
            test_images=_count(run_data, "val"), no_grn_block=args.no_grn_block,
            blocks=BLOCKS, finetune_recipe=FINETUNE, pretrain_recipe=PRETRAIN,
            seeds=list(range(args.seed, args.seed + args.seeds)), jobs=jobs_n,
            threads=args.threads, deadline_s=deadline, device=args.device,
            device_name=device_name, cpu_count=os.cpu_count(), torch=torch.__version__,
            load_average_start=load0,
            load_average_now=load_average(),
            complete=state["final"],
            runs={name: dict(rec, config=next(j["config"] for j in jobs if j["name"] == name))
                  for name, rec in records.items()},
            summary=summarise(records, jobs, args.no_grn_block), collapse=collapse,
            wall_seconds=time.time() - t0)
        if collapse.get("curves") and "plots" not in collapse:
            collapse["plots"] = plot_collapse(collapse, out)
        failed = [n for n, r in records.items() if "error" in r]
        missing = len(jobs) - len(records)
        footer = (f"\n\nbudget {args.budget}, {used}; {args.seeds} seeds; device {device_name}, "
                  f"{jobs_n} process(es) x {args.threads} thread(s); wall "
                  f"{results['wall_seconds']:.0f} s"
                  + (f"; {len(failed)} run(s) did not finish: {', '.join(failed)}"
                     if failed else "")
                  + (f"; IN PROGRESS: {missing} run(s) still to come" if missing else ""))
        (out / "results.json").write_text(json.dumps(results, indent=2, default=list))
        (out / "results.md").write_text(format_tables(results) + footer + "\n")
        return [format_tables(results) + footer, failed]

    def on_done(job: Job, record: dict, records: dict) -> None:
        status = (f"failed: {record['error']}" if "error" in record else
                  f"{record['seconds']:.0f} s" + (f", top-1 {record['best_top1']:.2f}%"
                                                  if "best_top1" in record else
                                                  f", loss {record.get('last_loss') or 0:.4f}"))
        say(f"[{time.time() - t0:5.0f} s] {len(records)}/{len(jobs)} {job.name}: {status}")
        pretrains = [j for j in jobs if j["kind"] == "pretrain"]
        if job.name in {j["name"] for j in pretrains} and all(
                j["name"] in records for j in pretrains):
            t = time.time()
            collapse.update(collapse_curves(records, jobs, run_data, budget, 0,
                                            "cuda" if args.device.startswith("cuda") else "cpu"))
            collapse["seconds"] = time.time() - t
            say(f"collapse curves measured ({time.time() - t:.0f} s)")
        write(records)

    records = run_jobs(runner_jobs(jobs, args.threads), jobs_n, deadline, work / "jobs",
                       on_done, keep_going=True)
    state["final"] = True
    text, failed = write(records)
    say(text)
    say(f"wrote {out / 'results.md'}, {out / 'results.json'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
