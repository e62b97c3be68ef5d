"""The demo: the small-image transform rule, its fine-tuning preset, the held-out split the
preset is chosen on, and the seeds-and-spread summary."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2.data import build_dataset, eval_transform, train_transform
from convnextv2.demos import classification as demo
from convnextv2.recipes.holdout import holdout_split
from convnextv2.recipes.presets import SMALL_IMAGE_SHORT, small_image_finetune


def _digit(size=28):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(1, 255, (size, size), np.uint8), "L")


def test_small_images_are_padded_not_resized_at_evaluation():
    img = _digit(28)
    x = eval_transform(32, 1)(img)
    assert x.shape == (1, 32, 32)
    zero = (0 - 0.449) / 0.226
    inner = (torch.from_numpy(np.array(img)).float() / 255 - 0.449) / 0.226
    torch.testing.assert_close(x[0, 2:30, 2:30], inner)          # the pixels, unscaled
    assert torch.allclose(x[0, :2], torch.tensor(zero)) and torch.allclose(x[0, :, 30:],
                                                                            torch.tensor(zero))
    # an image already at the size is untouched; a larger one is scaled down to fit
    assert torch.equal(eval_transform(28, 1)(img)[0], inner)
    assert eval_transform(32, 3)(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    # above 32 px the usual resize + center crop applies
    usual = repr(eval_transform(64, 1))
    assert "Resize" in usual and "FitToSize" not in usual


def test_small_image_training_crop_shifts_by_at_most_four_pixels():
    img = Image.new("L", (28, 28), 0)
    img.paste(255, (10, 10, 18, 18))                             # an 8x8 white square
    tf = train_transform(32, 1, auto_augment="none", reprob=0.0, hflip=0.0)
    assert "SmallImageCrop(size=32, padding=4" in repr(tf)
    assert "RandomResizedCrop" not in repr(tf)
    torch.manual_seed(0)
    rows = set()
    for _ in range(60):
        x = tf(img)[0]
        assert x.shape == (32, 32)
        ys, xs = torch.nonzero(x > 0, as_tuple=True)
        assert len(ys) == 64                                     # never rescaled: 8x8 pixels
        rows.add(int(ys.min()))
    # the square sits at row 12 after centring; RandomCrop(padding 4) moves it by -4..+4
    assert rows <= set(range(8, 17)) and len(rows) > 3
    big = train_transform(64, 1, auto_augment="none", reprob=0.0)
    assert "RandomResizedCrop" in repr(big)                      # only small images change


def test_preset_turns_off_the_long_schedule_regularisers():
    from convnextv2.recipes.finetune import FinetuneConfig
    ft = small_image_finetune(pretrained=True)
    scratch = small_image_finetune(pretrained=False)
    assert scratch["layer_decay"] == 1.0 and ft["layer_decay"] == SMALL_IMAGE_SHORT["layer_decay"]
    for values in (ft, scratch):
        assert values["mixup"] == values["cutmix"] == values["reprob"] == 0.0
        assert values["auto_augment"] == "none" and values["model_ema"] is False
        assert values["smoothing"] == 0.1
        FinetuneConfig(**values)                                 # every key is a config field
    assert small_image_finetune(True, lr=1.0)["lr"] == 1.0


def test_holdout_split_comes_from_the_training_images_only(tmp_path):
    folder = holdout_split("builtin", tmp_path / "fashion_holdout", holdout=500, seed=3)
    train, val = build_dataset(folder, "train"), build_dataset(folder, "val")
    original, test = build_dataset("builtin", "train"), build_dataset("builtin", "val")
    assert len(train) == len(original) - 500 and len(val) == 500
    assert train.classes == original.classes
    key = lambda a: {bytes(x) for x in a.reshape(len(a), -1)}     # noqa: E731
    orig, held, rest = key(original.images), key(val.images), key(train.images)
    assert held <= orig and rest <= orig and not held & rest
    assert not held & key(test.images)                           # not the test set
    # deterministic and reused
    stamp = (folder / "fingerprint.txt").read_text()
    assert holdout_split("builtin", folder, 500, 3) == folder
    assert (folder / "fingerprint.txt").read_text() == stamp
    with pytest.raises(ValueError, match="holdout"):
        holdout_split("builtin", tmp_path / "x", holdout=0)


def _fake_runs(pretrained, scratch):
    def run(seed, top1):
        return dict(seed=seed, time_s=1.0, summary=dict(
            best_top1=top1, final=dict(val_top1=top1), best_epoch=4, epochs=4, history=[]))
    return {demo.ARMS[0]: [run(i, v) for i, v in enumerate(pretrained)],
            demo.ARMS[1]: [run(i, v) for i, v in enumerate(scratch)]}


def test_summary_reports_mean_std_and_paired_gain_against_the_spread():
    cfg = demo.DemoConfig()
    r = demo.summarise(cfg, {}, 10.0, _fake_runs([82.0, 83.0, 84.0], [80.0, 80.5, 81.0]), 60.0)
    fc, sc = r["runs"]
    assert fc["top1"] == pytest.approx(83.0) and fc["top1_std"] == pytest.approx(1.0)
    assert sc["top1_std"] == pytest.approx(0.5)
    assert r["gains_per_seed"] == pytest.approx([2.0, 2.5, 3.0])
    assert r["top1_gain"] == pytest.approx(2.5) and r["gain_exceeds_spread"]
    assert r["same_sign_every_seed"] and r["winner"] == demo.ARMS[0]
    text = demo.format_table(r)
    assert "83.00 ± 1.00" in text and "it exceeds the seed spread" in text
    small = demo.summarise(cfg, {}, 1.0, _fake_runs([80.0, 82.0, 81.0], [81.0, 80.0, 80.5]), 2.0)
    assert not small["gain_exceeds_spread"]
    assert "does not exceed the seed spread" in demo.format_table(small)


def test_quick_demo_never_overwrites_an_earlier_one(tmp_path, capsys):
    from convnextv2.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    first = json.loads((out / "report" / "metrics.json").read_text())
    assert first["config"]["seeds"] == 2 and len(first["runs"][0]["top1_per_seed"]) == 2
    probes = first["pretrain"]["probes"]  # the encoder's k-NN and collapse, start and end
    assert [p["step"] for p in probes] == [0, first["pretrain"]["steps"]]
    assert (out / "report" / "pretrain_monitor.png").is_file()
    assert "Encoder probes during pretraining" in (out / "report" / "table.md").read_text()
    assert main(["demo", "--quick", "--output", str(out), "--seeds", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"writing this one to {tmp_path / 'demo-2'}" in printed
    assert json.loads((out / "report" / "metrics.json").read_text()) == first
    assert (tmp_path / "demo-2" / "report" / "table.md").is_file()
    assert main(["demo", "--quick", "--output", str(out), "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


# ---- the job runner the demos and studies share ------------------------------------------

JOBS_MODULE = '''
import os
import time


def double(x):
    return {"double": 2 * x, "pid": os.getpid()}


def boom():
    raise ValueError("bad input")


def slow():
    time.sleep(120)
    return {}
'''


@pytest.fixture
def jobs_file(tmp_path):
    path = tmp_path / "jobs.py"
    path.write_text(JOBS_MODULE)
    return path


def test_runner_in_process_follows_dependencies_and_stops_or_goes_on(jobs_file, capsys):
    import os

    from convnextv2.demos.runner import Job, run_jobs

    t = f"{jobs_file}:"
    done = []
    records = run_jobs([Job("b", t + "double", dict(x=2), deps=("a",)),
                        Job("a", t + "double", dict(x=1))],
                       on_done=lambda job, record, records: done.append(job.name))
    assert done == ["a", "b"]                                    # a dependency runs first
    assert records["b"]["double"] == 4 and records["a"]["pid"] == os.getpid()
    assert records["a"]["seconds"] >= 0
    # by default the first failure stops the batch with the job's own exception
    with pytest.raises(ValueError, match="bad input"):
        run_jobs([Job("x", t + "boom"), Job("y", t + "double", dict(x=1))])
    # keep_going records it, skips what needs it and runs the rest
    records = run_jobs([Job("x", t + "boom"), Job("y", t + "double", dict(x=1), deps=("x",)),
                        Job("z", t + "double", dict(x=3))], keep_going=True)
    assert records["x"]["error"] == "ValueError: bad input"
    assert records["y"]["error"].startswith("skipped: a run it needs failed")
    assert records["z"]["double"] == 6
    assert "Traceback" in capsys.readouterr().err                 # the failure is not hidden
    late = run_jobs([Job("a", t + "double", dict(x=1))], deadline_s=-1, keep_going=True)
    assert late["a"]["error"] == "skipped: past the deadline"


def test_runner_children_run_side_by_side_and_leave_nothing_running(jobs_file, tmp_path):
    import os
    import time

    from convnextv2.demos.runner import Job, JobFailed, run_jobs

    t = f"{jobs_file}:"
    logs = tmp_path / "logs"
    records = run_jobs([Job("one", t + "double", dict(x=5)), Job("bad", t + "boom"),
                        Job("after bad", t + "double", dict(x=1), deps=("bad",)),
                        Job("two", t + "double", dict(x=6)), Job("three", t + "double", dict(x=7))],
                       parallel=2, log_dir=logs, keep_going=True)
    assert [records[n]["double"] for n in ("one", "two", "three")] == [10, 12, 14]
    pids = {records[n]["pid"] for n in ("one", "two", "three")}
    assert os.getpid() not in pids and len(pids) <= 2            # 2 workers, reused
    assert records["bad"]["error"] == "ValueError: bad input"
    assert "bad input" in (logs / "bad.log").read_text()          # its traceback, kept
    assert records["after bad"]["error"].startswith("skipped")
    # without keep_going a failed child stops the batch, and a running one is killed
    start = time.time()
    with pytest.raises(JobFailed, match="bad: ValueError: bad input"):
        run_jobs([Job("slow", t + "slow"), Job("bad", t + "boom")], parallel=2)
    assert time.time() - start < 60
