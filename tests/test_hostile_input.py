"""Hostile and broken input: each case ends in a clear one-line error (exit 2) or a counted skip,
never a raw traceback or a half-written file (issue 5, item 4).

Everything runs through the real command line (``convnextv2.cli.main``) with a tiny model.
"""
import logging
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2 import training as T
from convnextv2.cli import main

from conftest import TOY, TOY_FLAGS

TINY = ["--model", "atto", *TOY_FLAGS,
        "--stem-stride", "1", "--device", "cpu", "--no-progress"]
PRETRAIN = ["pretrain", *TINY, "--img-size", "32", "--batch-size", "4", "--decoder-dim", "16",
            "--workers", "0", "--deterministic", "--recon-every", "0", "--epochs", "1"]
FINETUNE = ["finetune", *TINY, "--img-size", "32", "--batch-size", "4", "--epochs", "1",
            "--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--no-model-ema",
            "--max-steps-per-epoch", "3"]


def _png(path, size=(40, 36), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    """12 random PNGs in two class folders, train/ and val/ splits."""
    root = tmp_path_factory.mktemp("good")
    for split in ("train", "val"):
        for i in range(12 if split == "train" else 4):
            _png(root / split / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
    return root


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory):
    """The good images plus three bad files: random bytes, an empty file and a PNG cut in half
    (its header is fine; decoding fails)."""
    root = tmp_path_factory.mktemp("broken")
    for split in ("train", "val"):
        for i in range(12 if split == "train" else 4):
            _png(root / split / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
    bad = root / "train" / "a"
    (bad / "garbage.png").write_bytes(np.random.default_rng(1).bytes(300))
    (bad / "empty.jpg").write_bytes(b"")
    whole = _png(root / "whole.png", size=(64, 64), seed=5).read_bytes()
    (root / "whole.png").unlink()
    (bad / "truncated.png").write_bytes(whole[:len(whole) // 2])
    return root


def _tiny_classifier(path):
    from convnextv2.checkpoint import save_checkpoint
    from convnextv2.models.registry import create_model

    model = create_model("atto", num_classes=2, stem_stride=1, **TOY)
    save_checkpoint(model, path, layout="native")
    return path


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _no_temp_files(folder):
    """No half-written file anywhere under the run folder (temp names start with '.')."""
    return [p.name for p in folder.rglob(".*") if p.is_file()]


# -- images ------------------------------------------------------------------------------------
def _data_warnings(caplog) -> list[str]:
    """The data layer's warnings: one line each, no Python source location."""
    msgs = [r.getMessage() for r in caplog.records if r.name == "convnextv2.data"]
    assert all("\n" not in m and ".py:" not in m for m in msgs), msgs
    return msgs


def test_corrupt_images_are_skipped_counted_and_logged(broken_folder, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, "convnextv2.data"):
        rc = main([*PRETRAIN, "--data", str(broken_folder / "train"), "--output", str(tmp_path)])
    assert rc == 0
    assert any("skipped 3 unreadable image" in m for m in _data_warnings(caplog))
    assert "skipped 3 unreadable image(s)" in capsys.readouterr().out
    records = T.read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 3  # 12 readable images / batch 4
    assert all(r["skipped_images"] == 3 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)


def test_strict_data_makes_a_corrupt_image_fatal(broken_folder, tmp_path, capsys):
    rc = main([*PRETRAIN, "--strict-data", "--data", str(broken_folder / "train"),
               "--output", str(tmp_path / "run")])
    assert rc == 2
    err = _err(capsys)
    assert "unreadable image" in err and "broken" in err
    assert not T.list_checkpoints(tmp_path / "run")


def test_finetune_counts_corrupt_images_and_strict_data_stops(broken_folder, tmp_path, capsys,
                                                              caplog):
    import json

    with caplog.at_level(logging.WARNING, "convnextv2.data"):
        assert main([*FINETUNE, "--data", str(broken_folder), "--output",
                     str(tmp_path / "lenient")]) == 0
    _data_warnings(caplog)  # one line each (said once per process, like Python's warnings)
    config = json.loads((tmp_path / "lenient" / "config.json").read_text())
    assert config["skipped_images"] == 3
    assert "skipped 3 unreadable image(s)" in capsys.readouterr().out
    assert main([*FINETUNE, "--strict-data", "--data", str(broken_folder), "--output",
                 str(tmp_path / "strict")]) == 2
    assert "unreadable image" in _err(capsys)


def test_images_smaller_than_the_crop_are_upscaled_not_fatal(tmp_path):
    """8x8 images with a 32 px crop: the random-resized crop scales them up (documented)."""
    for i in range(8):
        _png(tmp_path / "tiny" / f"{i}.png", size=(8, 8), seed=i)
    assert main([*PRETRAIN, "--data", str(tmp_path / "tiny"), "--output",
                 str(tmp_path / "run")]) == 0
    losses = [r["loss"] for r in T.read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_image_size_not_a_multiple_of_the_patch_size(good_folder, tmp_path, capsys):
    assert main([*PRETRAIN, "--img-size", "30", "--data", str(good_folder / "train"),
                 "--output", str(tmp_path)]) == 2
    err = _err(capsys)
    assert "--img-size 30 must be a multiple of the patch size 8" in err


# -- folders -----------------------------------------------------------------------------------
def test_missing_dataset_folder(tmp_path, capsys):
    assert main([*PRETRAIN, "--data", str(tmp_path / "nowhere"), "--output",
                 str(tmp_path / "run")]) == 2
    assert "nowhere does not exist" in _err(capsys)


def test_empty_dataset_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([*PRETRAIN, "--data", str(tmp_path / "empty"), "--output",
                 str(tmp_path / "run")]) == 2
    assert "is empty" in _err(capsys)
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    (tmp_path / "noimages" / "a" / "readme.txt").write_text("not an image")
    assert main([*FINETUNE, "--data", str(tmp_path / "noimages"), "--output",
                 str(tmp_path / "run2")]) == 2
    assert "hold no images" in _err(capsys)


@pytest.mark.parametrize("command", ["pretrain", "finetune", "eval"])
def test_unwritable_output_folder(good_folder, tmp_path, capsys, command):
    """A path below a regular file cannot be created, even by root (chmod would not stop
    root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = dict(pretrain=PRETRAIN, finetune=FINETUNE)[command] if command != "eval" else [
        "eval", "--checkpoint", str(_tiny_classifier(tmp_path / "clf.safetensors")),
        "--device", "cpu", "--img-size", "32", "--json"]
    data = good_folder / "train" if command == "pretrain" else good_folder
    assert main([*argv, "--data", str(data), "--output", str(blocker / "run")]) == 2
    err = _err(capsys)
    assert f"--output {blocker / 'run'}: cannot write there" in err


# -- non-finite loss ---------------------------------------------------------------------------
def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(
        good_folder, tmp_path, capsys, monkeypatch):
    from convnextv2.fcmae.fcmae import FCMAE

    real, calls = FCMAE.forward, []

    def poisoned(self, *args, **kwargs):  # the whole forward: the loss has several code paths
        loss, pred, mask = real(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("inf") if len(calls) == 2 else loss), pred, mask

    monkeypatch.setattr(FCMAE, "forward", poisoned)
    rc = main([*PRETRAIN, "--save-every-steps", "1", "--data", str(good_folder / "train"),
               "--output", str(tmp_path)])
    assert rc == 1
    err = _err(capsys)
    assert "non-finite loss" in err and "optimizer step 2" in err
    assert "checkpoint-00000001.pt" in err
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["checkpoint-00000001.pt"]
    T.load_run_state(tmp_path / "checkpoint-00000001.pt")  # complete and readable
    assert not (tmp_path / "encoder.safetensors").exists()
    assert _no_temp_files(tmp_path) == []


def test_finetune_non_finite_loss_stops_with_the_step(good_folder, tmp_path, capsys,
                                                      monkeypatch):
    import convnextv2.recipes.finetune as ft

    real = ft._criterion

    def poisoned_criterion(hp, mixup_active):
        inner, calls = real(hp, mixup_active), []

        def loss(logits, y):
            calls.append(1)
            value = inner(logits, y)
            return value * float("nan") if len(calls) == 2 else value
        return loss

    monkeypatch.setattr(ft, "_criterion", poisoned_criterion)
    assert main([*FINETUNE, "--data", str(good_folder), "--output", str(tmp_path)]) == 1
    err = _err(capsys)
    assert ("loss is nan" in err and "step 1" in err) or (  # the finetune loop, or the shared
        "non-finite loss (nan) at optimizer step 2" in err)  # engine's message for the same stop
    assert not (tmp_path / "best.safetensors").exists()


# -- checkpoints -------------------------------------------------------------------------------
def test_resume_from_a_checkpoint_of_another_architecture(good_folder, tmp_path, capsys):
    data = str(good_folder / "train")
    assert main([*PRETRAIN, "--data", data, "--output", str(tmp_path / "a")]) == 0
    wider = [*PRETRAIN]
    wider[wider.index("--dims") + 4] = "40"
    assert main([*wider, "--data", data, "--output", str(tmp_path / "b"), "--resume",
                 str(T.latest_checkpoint(tmp_path / "a"))]) == 2
    err = _err(capsys)
    # refused either by the run's saved options or by the weights' shapes, naming what differs
    assert ("its weights do not fit this model" in err and "--model" in err) or (
        "other dims" in err and "[8, 16, 24, 40]" in err)


def test_eval_with_a_checkpoint_of_another_architecture(good_folder, tmp_path, capsys):
    _tiny_classifier(tmp_path / "tiny.safetensors")
    rc = main(["eval", "--model", "convnextv2_atto", "--checkpoint",
               str(tmp_path / "tiny.safetensors"), "--data", str(good_folder), "--device", "cpu",
               "--output", str(tmp_path / "ev")])
    assert rc == 2
    err = _err(capsys)
    assert "--model convnextv2_atto has depths [2, 2, 6, 2]" in err
    assert "[1, 1, 1, 1]" in err


class _RunsCode:
    """Unpickling this would create a marker file: a stand-in for a malicious payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model": _RunsCode(marker), "weight": torch.zeros(2)}, f)
    return path


def test_pickles_that_need_arbitrary_code_are_refused(good_folder, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = _evil_pickle(tmp_path / "evil.pt", marker)
    rc = main(["eval", "--checkpoint", str(evil), "--data", str(good_folder), "--device", "cpu"])
    assert rc == 2
    err = _err(capsys)
    assert "weights_only" in err
    rc = main([*PRETRAIN, "--data", str(good_folder / "train"), "--output", str(tmp_path / "r"),
               "--resume", str(evil)])
    assert rc == 2
    assert "cannot read run state" in _err(capsys)
    assert not marker.exists()  # nothing was executed


def test_truncated_run_state_is_refused_and_resume_auto_ignores_temp_files(
        good_folder, tmp_path, capsys):
    data = str(good_folder / "train")
    assert main([*PRETRAIN, "--data", data, "--output", str(tmp_path)]) == 0
    good = T.latest_checkpoint(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    assert main([*PRETRAIN, "--epochs", "2", "--data", data, "--output", str(tmp_path),
                 "--resume", str(cut)]) == 2
    assert "cannot read run state" in _err(capsys)
    # the same half file under a temp name, as an interrupted write leaves it: auto skips it
    cut.rename(tmp_path / ".checkpoint-00000099.pt.abc.tmp")
    assert T.resolve_resume("auto", tmp_path) == good


# -- skip counts across worker processes (issue 10, item 6) ------------------------------------
@pytest.fixture(scope="module")
def cut_jpeg_folder(tmp_path_factory):
    """The good tree plus a JPEG cut short: its header passes the scan, so it fails only when
    a (worker) process decodes it."""
    root = tmp_path_factory.mktemp("cut")
    for split in ("train", "val"):
        for i in range(12 if split == "train" else 4):
            _png(root / split / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "whole.jpg", quality=95)
    data = (root / "whole.jpg").read_bytes()
    (root / "whole.jpg").unlink()
    (root / "train" / "a" / "cut.jpg").write_bytes(data[:len(data) // 2])
    return root


def test_pretrain_counts_a_skip_made_in_a_worker_process(cut_jpeg_folder, tmp_path, caplog):
    args = [*PRETRAIN, "--data", str(cut_jpeg_folder / "train"), "--output", str(tmp_path)]
    args[args.index("--workers") + 1] = "2"
    with caplog.at_level(logging.WARNING, "convnextv2.data"):
        assert main(args) == 0
    records = T.read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["skipped_images"] == 1  # 13 files, 1 skipped while decoding


def test_finetune_summary_counts_a_skip_made_in_a_worker_process(cut_jpeg_folder, tmp_path):
    import json

    args = [*FINETUNE, "--workers", "2", "--data", str(cut_jpeg_folder),
            "--output", str(tmp_path), "--max-steps-per-epoch", "100"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_images"] == 1


def test_pretraining_reads_a_train_folder_without_val(good_folder, tmp_path, capsys):
    only_train = tmp_path / "data"
    for png in (good_folder / "train").rglob("*.png"):
        target = only_train / "train" / png.parent.name / png.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png.read_bytes())
    assert main([*PRETRAIN, "--data", str(only_train), "--output", str(tmp_path / "run")]) == 0
    assert len(T.read_metrics(tmp_path / "run" / "metrics.jsonl")) == 3  # 12 images / batch 4
    assert main([*FINETUNE, "--data", str(only_train), "--output", str(tmp_path / "ft")]) == 2
    assert "has train/ but no val/ folder" in _err(capsys)
