"""Old code against new code, in one process: FCMAE training-step CPU time, interleaved.

On a shared or virtualised CPU, step times drift by 10% between runs, more than many changes
are worth. Here both versions of the package are imported side by side (the old one under
another name, from a copy of its ``src/convnextv2``), built with the same weights and masks, and
stepped in turn, so drift hits both alike; the median per-round ratio old / new is the figure.

    git worktree add /tmp/old HEAD~1
    python benchmarks/ab_versions.py --old /tmp/old/src --model convnextv2_atto --batch 32 \\
        --contenders sparse,dense,encoder --rounds 6

``dense`` is the masked-dense FCMAE backend; ``encoder`` the unmasked dense encoder with a
trivial loss, as in ``fcmae_speed.py``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from train_step import TrainStep

OLD = "convnextv2_old"


def import_old(src: Path):
    """The package at ``src/convnextv2`` imported as ``convnextv2_old`` (its imports are
    relative; its torch.library ops get another namespace, so both can register)."""
    pkg = src / "convnextv2"
    if not (pkg / "__init__.py").is_file():
        raise SystemExit(f"--old {src}: no convnextv2 package there (give the src folder)")
    root = Path(tempfile.mkdtemp(prefix="ab_versions_"))
    shutil.copytree(pkg, root / OLD, ignore=shutil.ignore_patterns("__pycache__"))
    for f in (root / OLD).rglob("*.py"):
        text = f.read_text()
        if "convnextv2::" in text:
            f.write_text(text.replace("convnextv2::", "convnextv2old::"))
    sys.path.insert(0, str(root))
    return root


class EncoderLoss(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, imgs, mask=None, return_pred=False):
        return (self.encoder.forward_features(imgs).float().pow(2).mean(),)


def build(pkg: str, contender: str, model_name: str, state: dict, mask_ratio: float):
    fcmae = importlib.import_module(pkg + ".fcmae.fcmae")
    m = fcmae.FCMAE(model_name, mask_ratio=mask_ratio)
    m.load_state_dict(state)
    if contender == "encoder":
        m = EncoderLoss(m.encoder)
    else:
        m.set_backend("sparse" if contender == "sparse" else "dense")
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    return step_class(pkg)(m, opt)


def step_class(pkg: str):
    """The package's own ``TrainStep`` where its tree still has one (``fcmae/fast.py`` of older
    versions), else ``train_step.TrainStep``: without a CUDA graph both are the same plain step
    (zero_grad, forward with ``return_pred=False``, backward, optimizer step)."""
    if importlib.util.find_spec(pkg + ".fcmae.fast") is None:
        return TrainStep
    return importlib.import_module(pkg + ".fcmae.fast").TrainStep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True, help="the old version's src folder")
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--contenders", default="sparse,dense,encoder")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    contenders = args.contenders.split(",")
    bad = set(contenders) - {"sparse", "dense", "encoder"}
    if bad:
        raise SystemExit(f"unknown contenders {sorted(bad)}; choose from sparse, dense, encoder")
    torch.set_num_threads(args.threads)
    import_old(args.old)
    from convnextv2.fcmae.fcmae import FCMAE
    torch.manual_seed(0)
    proto = FCMAE(args.model, mask_ratio=args.mask_ratio)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size)
    gen = torch.Generator().manual_seed(1)
    masks = [proto.random_mask(imgs, generator=gen) for _ in range(4)]
    steps = {}
    for version, pkg in (("old", OLD), ("new", "convnextv2")):
        for c in contenders:
            steps[(version, c)] = build(pkg, c, args.model, proto.state_dict(), args.mask_ratio)
            steps[(version, c)](imgs, masks[0])  # warm-up
    times = {key: [] for key in steps}
    for r in range(args.rounds):
        for key, step in steps.items():
            c0 = time.process_time()
            step(imgs, masks[r % len(masks)])
            times[key].append(time.process_time() - c0)
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), CPU time per step, "
          f"median of {args.rounds} interleaved rounds:")
    for c in contenders:
        old, new = times[("old", c)], times[("new", c)]
        ratio = statistics.median(o / n for o, n in zip(old, new))
        print(f"  {c:8s} old {1e3 * statistics.median(old):7.0f} ms  new "
              f"{1e3 * statistics.median(new):7.0f} ms  old/new per round {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
