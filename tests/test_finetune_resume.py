"""Mid-epoch crash safety of ``convnextv2 finetune``: --save-every-steps, --max-steps, exact
resume (augmentation, mixup/cutmix, drop path and EMA included), keep-last-K, and --fsdp
checkpoints that load into a single-process model."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from convnextv2 import training as T
from convnextv2.cli import main

# RandAugment, random erasing, mixup + cutmix, drop path and EMA all on: every random draw of
# the recipe must come back identically after a resume. A large lr makes the steps matter.
RUN = ["--data", "builtin", "--train-subset", "24", "--val-subset", "16",
       "--batch-size", "4", "--epochs", "2", "--lr", "5e-3", "--warmup-epochs", "0",
       "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--aa", "rand-m9-mstd0.5-inc1",
       "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--deterministic",
       "--no-progress", "--device", "cpu", "--save-every-steps", "2", "--keep-last", "3"]
STEPS = 12  # 24 images / batch 4 = 6 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def args(toy_cli):
    return ["finetune", *toy_cli, *RUN]


def _run(args, out, *extra):
    assert main([*args, "--output", str(out), *extra]) == 0


def _steps(out):
    records = T.read_metrics(out / "steps.jsonl")
    return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in records]


def _checkpoints(out):
    return [p.name for p in T.list_checkpoints(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, args):
    root = tmp_path_factory.mktemp("ft_resume")
    whole, cut = root / "whole", root / "cut"
    _run(args, whole)
    _run(args, cut, "--max-steps", "4")                     # stops inside epoch 1
    cut_after_first = (_checkpoints(cut), _steps(cut))
    _run(args, cut, "--resume", "auto", "--max-steps", "9")  # resumes mid-epoch, stops in 2
    cut_after_second = _checkpoints(cut)
    _run(args, cut, "--resume", "auto")                     # to the end
    return dict(whole=whole, cut=cut, cut_after_first=cut_after_first,
                cut_after_second=cut_after_second)


def test_interrupted_twice_mid_epoch_repeats_every_step_loss(runs):
    whole, cut = _steps(runs["whole"]), _steps(runs["cut"])
    assert [s[0] for s in whole] == list(range(1, STEPS + 1))
    assert cut == whole  # bitwise: same losses and lrs at every step, each step once
    assert len({s[2] for s in whole}) == STEPS  # the losses do move


def test_interrupted_run_ends_with_the_same_weights_ema_and_epoch_records(runs):
    from safetensors.torch import load_file
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, b = load_file(runs["whole"] / name), load_file(runs["cut"] / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    drop = ("img_per_s", "epoch_time_s")
    epochs = [[{k: v for k, v in r.items() if k not in drop}
               for r in T.read_metrics(out / "metrics.jsonl")]
              for out in (runs["whole"], runs["cut"])]
    assert [r["epoch"] for r in epochs[0]] == [1, 2]
    assert epochs[0] == epochs[1]  # train loss of a resumed epoch counts the pre-crash part


def test_save_every_steps_and_keep_last(runs):
    first_ckpts, first_steps = runs["cut_after_first"]
    assert first_ckpts == ["checkpoint-00000002.pt", "checkpoint-00000004.pt"]
    assert [s[0] for s in first_steps] == [1, 2, 3, 4]
    # steps 6 (epoch end) and 8 (every 2), 9 (--max-steps); keep-last 3 dropped 2 and 4
    assert runs["cut_after_second"] == ["checkpoint-00000006.pt", "checkpoint-00000008.pt",
                                        "checkpoint-00000009.pt"]
    assert _checkpoints(runs["whole"]) == ["checkpoint-00000008.pt", "checkpoint-00000010.pt",
                                           "checkpoint-00000012.pt"]
    state = T.load_run_state(runs["whole"] / "checkpoint-00000008.pt")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (1, 2, 8)
    assert state["ema"] is not None
    end = T.load_run_state(runs["whole"] / "checkpoint-00000012.pt")
    assert (end["epoch"], end["batches_done"]) == (2, 0)


def test_keyed_mixup_depends_on_the_key_only_and_restores_the_rngs():
    from timm.data import Mixup

    from convnextv2.recipes.finetune_data import keyed_mixup

    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=3)
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).view(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])

    def draw(s):
        torch.manual_seed(s), np.random.seed(s), random.seed(s)  # unrelated prior state
        before = (torch.rand(1), np.random.rand(), random.random())
        torch.manual_seed(s), np.random.seed(s), random.seed(s)
        out = keyed_mixup(mix, x.clone(), y, seed=7, step=3)
        after = (torch.rand(1), np.random.rand(), random.random())
        assert before == after  # the caller's streams are untouched
        return out

    (xa, ya), (xb, yb) = draw(0), draw(123)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    others = [keyed_mixup(mix, x.clone(), y, seed=7, step=s)[1] for s in range(4, 10)]
    assert any(not torch.equal(ya, o) for o in others)  # another step, another draw


def test_bad_run_options_are_named(tmp_path, capsys, args):
    base = [a for a in args if a not in ("--model-ema",)]
    assert main([*base, "--output", str(tmp_path / "a"), "--max-steps", "0"]) == 2
    assert "--max-steps" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "b"), "--fsdp"]) == 2
    assert "--no-model-ema" in capsys.readouterr().err


FSDP_RUN = ["--data", "builtin", "--train-subset", "16", "--val-subset", "8", "--epochs", "1",
            "--lr", "5e-3", "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--aa",
            "none", "--reprob", "0", "--drop-path", "0", "--no-model-ema", "--no-progress",
            "--device", "cpu", "--deterministic"]


def test_fsdp_two_processes_match_one_process_and_load_single_process(tmp_path, toy_cli):
    """2 gloo processes x 4 images, sharded, against 1 process x 8 images: same parameters
    (float summation order aside); the sharded run's files are plain single-process files."""
    from convnextv2.recipes.evaluate import load_classifier

    FSDP_ARGS = ["finetune", *toy_cli, *FSDP_RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "convnextv2", *FSDP_ARGS, "--batch-size", "4", "--fsdp",
         "--output", str(tmp_path / "fsdp")],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert main([*FSDP_ARGS, "--batch-size", "8", "--output", str(tmp_path / "one")]) == 0
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])

    one = T.load_run_state(tmp_path / "one" / "checkpoint-00000002.pt")
    sharded = T.load_run_state(tmp_path / "fsdp" / "checkpoint-00000002.pt")
    assert sharded["model"].keys() == one["model"].keys()
    # summation order differs between 1 and 2 processes; AdamW divides by sqrt(v), so a weight
    # whose gradient is near zero can move by a different fraction of the lr (5e-3): allow 1%
    # of one lr step, far below what a wrong gradient or a skipped step would change
    for k, v in one["model"].items():
        torch.testing.assert_close(sharded["model"][k], v, atol=5e-3 * 0.01, rtol=1e-4)
    # the gathered optimizer state is keyed as a single-process AdamW keys it
    assert sorted(sharded["optimizer"]["state"]) == sorted(one["optimizer"]["state"])
    for i, moments in one["optimizer"]["state"].items():
        torch.testing.assert_close(sharded["optimizer"]["state"][i]["exp_avg"],
                                   moments["exp_avg"], atol=1e-5, rtol=0)
    model, info = load_classifier(tmp_path / "fsdp" / "last.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sharded["model"][k])
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["final"]["val_top1"] == pytest.approx(
        json.loads((tmp_path / "one" / "summary.json").read_text())["final"]["val_top1"])


def test_loader_workers_do_not_change_the_augmentation(runs, tmp_path, args):
    """Each image's augmentation is keyed by (seed, epoch, index), not drawn from whichever
    worker process loads it: 2 workers repeat the 0-worker run's losses exactly."""
    _run(args, tmp_path / "w2", "--workers", "2", "--max-steps", "3")
    assert _steps(tmp_path / "w2") == _steps(runs["whole"])[:3]
