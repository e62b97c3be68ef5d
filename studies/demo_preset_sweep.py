"""Choose the demo's fine-tuning preset on images held out from the TRAINING split.

The rule (``convnextv2.recipes.presets``): fixed choices (small-image crop, no heavy
regularisation, no EMA, smoothing 0.1, wd 0.05, warmup 0.5 epoch + cosine) plus two free ones
picked here, never on the test set:

1. the peak lr from ``LR_CANDIDATES`` (at the preset's batch): the one with the best held-out
   top-1 of the from-scratch arm, the baseline, so that tuning never favours FCMAE; both arms
   then share it (the FCMAE arm, layer decay 0.9, is run at every lr too, for information);
2. the FCMAE arm's layer-wise lr decay from ``LAYER_DECAY_CANDIDATES`` at that lr.

Data: ``--holdout`` (default 2,000) images of the training split are set aside as the
validation set; FCMAE pretrains on the remaining ones (no labels) and fine-tuning draws its
2,500 labelled images from them too, exactly as the demo does with the full training split.
One seed: the sweep picks among settings several points apart, not within the seed noise.

    .venv/bin/python studies/demo_preset_sweep.py --output runs/demo_sweep

Writes OUTPUT/results.json (every run) and OUTPUT/results.md (the table and the choice).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/demo_sweep")
    p.add_argument("--holdout", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny budget, to check that it runs")
    args = p.parse_args(argv)

    import torch

    from convnextv2.recipes.finetune import FinetuneConfig, finetune
    from convnextv2.recipes.pretrain import PretrainConfig, pretrain
    from convnextv2.demos.classification import DemoConfig, finetune_kwargs, pretrain_kwargs
    from convnextv2.recipes.holdout import holdout_split
    from convnextv2.recipes.presets import LAYER_DECAY_CANDIDATES, LR_CANDIDATES
    from convnextv2.training.output import fresh_output

    torch.set_num_threads(args.threads)
    out = fresh_output(args.output)  # an earlier sweep is left alone: OUTPUT-2, ...
    cfg = DemoConfig.quick_config(str(out)) if args.quick else DemoConfig(output=str(out))
    cfg.progress = sys.stderr.isatty()
    cfg.val_subset = None
    data = str(holdout_split("builtin", out / "fashion_holdout", args.holdout, args.seed))
    t0 = time.time()
    print(f"held-out split: {data} (training images minus {args.holdout}; validation = those "
          f"{args.holdout})", flush=True)
    pretrain(PretrainConfig(**pretrain_kwargs(cfg, data, str(out / "pretrain"))))
    encoder = str(out / "pretrain" / "encoder.safetensors")
    runs = []

    def run(name, lr, ckpt, layer_decay):
        folder = out / f"{name}_lr{lr:g}_ld{layer_decay:g}"
        kw = finetune_kwargs(cfg, data, str(folder), args.seed, ckpt, lr=lr,
                             layer_decay=layer_decay)
        t = time.time()
        s = finetune(FinetuneConfig(**kw))
        runs.append(dict(arm=name, lr=lr, layer_decay=layer_decay, top1=s["best_top1"],
                         final_top1=(s["final"] or {}).get("val_top1"),
                         seconds=time.time() - t))
        print(f"{name} lr {lr:g} layer decay {layer_decay:g}: held-out top-1 "
              f"{s['best_top1']:.2f}% ({time.time() - t:.0f} s)", flush=True)
        return s["best_top1"]

    ld0 = LAYER_DECAY_CANDIDATES[0]
    score = {}
    for lr in LR_CANDIDATES:
        score[lr] = run("scratch", lr, None, 1.0)
        run("fcmae", lr, encoder, ld0)
    best_lr = max(score, key=score.get)
    ld_scores = {ld0: next(r["top1"] for r in runs
                           if r["arm"] == "fcmae" and r["lr"] == best_lr)}
    for ld in LAYER_DECAY_CANDIDATES[1:]:
        ld_scores[ld] = run("fcmae", best_lr, encoder, ld)
    best_ld = max(ld_scores, key=ld_scores.get)

    results = dict(holdout=args.holdout, seed=args.seed, data=data, runs=runs,
                   lr_scores=score, chosen=dict(lr=best_lr, layer_decay=best_ld),
                   total_seconds=time.time() - t0, threads=args.threads, quick=args.quick)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| arm | lr | layer decay | held-out top-1 (%) | time (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['lr']:g} | {r['layer_decay']:g} | {r['top1']:.2f} | "
              f"{r['seconds']:.0f} |" for r in runs]
    lines += ["", f"chosen: lr {best_lr:g} (from-scratch arm: "
                  + ", ".join(f"{lr:g} -> {v:.2f}" for lr, v in score.items())
                  + f"), FCMAE layer decay {best_ld:g}; total {time.time() - t0:.0f} s"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
