"""Every command against bad arguments and bad files, as a table (issue 10, item 7).

Each case must end the way a user mistake should: exit status 2, exactly one line on stderr
that names the bad input, no "Traceback", and no change to a run folder that existed before
(every file in it is hashed, with its mode, before and after). Most cases run in-process
(``convnextv2.cli.main``: seconds on a small machine); a few run the real ``python -m
convnextv2`` entry point to prove the same holds there.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2.cli import main

from conftest import TOY, TOY_FLAGS

ARCH = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--stem-stride", "1"]
PRE = ["pretrain", "--model", "atto", *ARCH, "--img-size", "32", "--batch-size", "4",
       "--decoder-dim", "16", "--workers", "0", "--epochs", "1", "--recon-every", "0",
       "--no-progress"]
FT = ["finetune", "--model", "atto", *ARCH, "--img-size", "32", "--batch-size", "4",
      "--epochs", "1", "--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0",
      "--no-model-ema", "--max-steps-per-epoch", "1", "--no-progress"]


class _RunsCode:
    """A pickle that would create a file if it were ever unpickled with code allowed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _png(path: Path, seed: int = 0, size=(36, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """The world the cases run in: data trees, checkpoints, bad files and an existing run."""
    from convnextv2.checkpoint import save_checkpoint
    from convnextv2.fcmae.fcmae import FCMAE
    from convnextv2.fcmae.io import save_fcmae
    from convnextv2.models.registry import create_model

    root = tmp_path_factory.mktemp("table")
    for split in ("train", "val"):
        for i in range(4):
            _png(root / "data" / split / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
            _png(root / "train_only" / "train" / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
            _png(root / "empty_class" / split / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
        (root / "empty_class" / split / "c").mkdir()
    (root / "empty_folder").mkdir()
    arch = dict(TOY, stem_stride=1)
    torch.manual_seed(0)
    save_checkpoint(create_model("atto", num_classes=2, **arch), root / "clf.safetensors",
                    metadata={"class_names": json.dumps(["a", "b"]), "img_size": "32"})
    save_checkpoint(create_model("atto", num_classes=0, **arch), root / "encoder.safetensors")
    save_fcmae(FCMAE(create_model("atto", num_classes=0, **arch), decoder_embed_dim=16),
               root / "fcmae.safetensors")
    (root / "not_an_image.png").write_text("this is text, not a PNG\n")
    (root / "garbage.pt").write_bytes(np.random.default_rng(1).bytes(500))
    whole = _png(root / "whole.png", size=(64, 64), seed=5).read_bytes()
    (root / "truncated.png").write_bytes(whole[:len(whole) // 2])
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(root / "whole.jpg", quality=90)
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:400])
    # torch.save's container with a pickled call in it, and a plain pickle.dump of the same
    torch.save({"model": _RunsCode(root / "PWNED"), "w": torch.zeros(2)}, root / "evil.pt")
    with open(root / "evil_plain.pkl", "wb") as f:
        pickle.dump({"model": _RunsCode(root / "PWNED"), "w": torch.zeros(2)}, f)
    (root / "a-file").write_text("a file where a folder is needed\n")
    (root / "existing.safetensors").write_bytes((root / "clf.safetensors").read_bytes())
    (root / "existing_hf").mkdir()
    (root / "existing_hf" / "config.json").write_text("{}")
    # an earlier run: what a pretraining run leaves, byte for byte the same after every case
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps(dict(step=s, epoch=0, loss=1.0 / s, lr=1e-3)) + "\n" for s in range(1, 49)))
    (run / "config.json").write_text(json.dumps({"model": "convnextv2_atto"}))
    torch.save({"format": "x", "step": 48}, run / "checkpoint-00000048.pt")
    (run / "encoder.safetensors").write_bytes((root / "encoder.safetensors").read_bytes())
    return {"root": root, "run": run}


def _hash_tree(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# (id, argv, words the one error line must contain, case-insensitively). In argv {R} is the
# world's folder, {RUN} the existing run (which must not change) and {OUT} a fresh output
# folder of the case's own (which must hold no file afterwards: no config.json or empty
# metrics.jsonl left behind by a run that refused to start).
CASES = [
    # info
    ("info-unknown-model", ["info", "--model", "nope"], ["nope"]),
    ("info-three-sizes", ["info", "--img-size", "1", "2", "3"], ["--img-size"]),
    ("info-size-not-a-number", ["info", "--img-size", "abc"], ["--img-size", "abc"]),
    ("info-negative-classes", ["info", "--model", "atto", "--num-classes", "-3"], ["-3"]),
    ("info-zero-channels", ["info", "--model", "atto", "--in-chans", "0"], ["--in-chans"]),
    ("info-zero-stem", ["info", "--model", "atto", "--stem-stride", "0"], ["stem"]),
    # convert
    ("convert-missing-input", ["convert", "{R}/missing.pt", "{R}/out1.safetensors"], ["missing.pt"]),
    ("convert-onto-existing-file", ["convert", "{R}/clf.safetensors", "{R}/existing.safetensors"],
     ["existing.safetensors", "--overwrite"]),
    ("convert-onto-existing-folder", ["convert", "{R}/clf.safetensors", "{R}/existing_hf",
                                      "--to", "hf"], ["existing_hf", "--overwrite"]),
    ("convert-onto-run-folder", ["convert", "{R}/clf.safetensors", "{RUN}"], ["--overwrite"]),
    ("convert-garbage", ["convert", "{R}/garbage.pt", "{R}/out2.safetensors"], ["garbage.pt"]),
    ("convert-evil-pickle", ["convert", "{R}/evil.pt", "{R}/out3.safetensors"],
     ["evil.pt", "convnextv2 convert --trust-pickle"]),
    ("convert-evil-plain-pickle", ["convert", "{R}/evil_plain.pkl", "{R}/out4.safetensors"],
     ["evil_plain.pkl", "convnextv2 convert --trust-pickle"]),
    ("convert-bad-layout", ["convert", "{R}/clf.safetensors", "{R}/o.pt", "--to", "onnx"],
     ["--to", "onnx"]),
    ("convert-into-a-file", ["convert", "{R}/clf.safetensors", "{R}/a-file/x.safetensors"],
     ["a-file"]),
    # pretrain
    ("pretrain-device-tpu", [*PRE, "--data", "{R}/data/train", "--output", "{RUN}",
                             "--device", "tpu"], ["tpu"]),
    ("pretrain-device-cuda-9", [*PRE, "--data", "{R}/data/train", "--output", "{RUN}",
                                "--device", "cuda:9"], ["cuda:9"]),
    ("pretrain-existing-run", [*PRE, "--data", "{R}/data/train", "--output", "{RUN}"],
     ["--resume auto", "--overwrite"]),
    ("pretrain-mask-ratio-0", [*PRE, "--data", "{R}/data/train", "--output", "{RUN}",
                               "--mask-ratio", "0"], ["--mask-ratio"]),
    ("pretrain-mask-ratio-1", [*PRE, "--data", "{R}/data/train", "--output", "{RUN}",
                               "--mask-ratio", "1"], ["--mask-ratio"]),
    ("pretrain-negative-weight-decay", [*PRE, "--data", "{R}/data/train", "--output", "{RUN}",
                                        "--weight-decay", "-0.05"], ["--weight-decay"]),
    ("pretrain-keep-last-negative", [*PRE, "--data", "{R}/data/train", "--output", "{RUN}",
                                     "--keep-last", "-1"], ["--keep-last"]),
    ("pretrain-decoder-dim-0", [*PRE, "--decoder-dim", "0", "--data", "{R}/data/train",
                                "--output", "{OUT}"], ["--decoder-dim"]),
    ("pretrain-missing-data", [*PRE, "--data", "{R}/nowhere", "--output", "{OUT}"], ["nowhere"]),
    ("pretrain-image-over-max-pixels", [*PRE, "--data", "{R}/data/train", "--output", "{OUT}",
                                        "--strict-data", "--max-image-pixels", "100"],
     ["above the limit of 100", "--max-image-pixels"]),
    ("pretrain-max-image-pixels-0", [*PRE, "--data", "{R}/data/train", "--output", "{OUT}",
                                     "--max-image-pixels", "0"], ["--max-image-pixels", ">= 1"]),
    ("finetune-image-over-max-pixels", [*FT, "--data", "{R}/data", "--output", "{OUT}",
                                        "--strict-data", "--max-image-pixels", "100"],
     ["above the limit of 100", "--max-image-pixels"]),
    ("pretrain-data-is-a-file", [*PRE, "--data", "{R}/a-file", "--output", "{OUT}"], ["a-file"]),
    ("pretrain-empty-data", [*PRE, "--data", "{R}/empty_folder", "--output", "{OUT}"],
     ["empty_folder"]),
    ("pretrain-img-size-off-patch", [*PRE[:-1], "--img-size", "30", "--data", "{R}/data/train",
                                     "--output", "{OUT}"], ["--img-size"]),
    ("pretrain-resume-evil", [*PRE, "--data", "{R}/data/train", "--output", "{RUN}",
                              "--resume", "{R}/evil.pt"], ["evil.pt"]),
    ("pretrain-batch-not-a-number", [*PRE, "--batch-size", "four", "--data", "{R}/data/train",
                                     "--output", "{RUN}"], ["--batch-size", "four"]),
    # finetune
    ("finetune-device-tpu", [*FT, "--data", "{R}/data", "--output", "{RUN}", "--device", "tpu"],
     ["tpu"]),
    ("finetune-existing-run", [*FT, "--data", "{R}/data", "--output", "{RUN}"],
     ["--resume auto", "--overwrite"]),
    ("finetune-smoothing-1.5", [*FT, "--data", "{R}/data", "--output", "{RUN}",
                                "--smoothing", "1.5"], ["--smoothing"]),
    ("finetune-drop-path-1.5", [*FT, "--data", "{R}/data", "--output", "{RUN}",
                                "--drop-path", "1.5"], ["--drop-path"]),
    ("finetune-aa-bogus", [*FT[:-1], "--aa", "bogus", "--data", "{R}/data", "--output", "{RUN}"],
     ["--aa", "bogus"]),
    ("finetune-train-subset-0", [*FT, "--data", "{R}/data", "--output", "{RUN}",
                                 "--train-subset", "0"], ["--train-subset"]),
    ("finetune-negative-weight-decay", [*FT, "--data", "{R}/data", "--output", "{RUN}",
                                        "--weight-decay", "-1"], ["--weight-decay"]),
    ("finetune-keep-last-negative", [*FT, "--data", "{R}/data", "--output", "{RUN}",
                                     "--keep-last", "-1"], ["--keep-last"]),
    ("finetune-no-val-folder", [*FT, "--data", "{R}/train_only", "--output", "{OUT}"], ["val"]),
    ("finetune-empty-class-strict", [*FT, "--strict-data", "--data", "{R}/empty_class",
                                     "--output", "{OUT}"], ["c", "--strict-data"]),
    ("finetune-from-evil-pickle", [*FT, "--data", "{R}/data", "--output", "{RUN}",
                                   "--finetune", "{R}/evil.pt"], ["evil.pt"]),
    ("finetune-missing-data", [*FT, "--data", "{R}/nowhere", "--output", "{OUT}"], ["nowhere"]),
    # eval
    ("eval-device-tpu", ["eval", "--checkpoint", "{R}/clf.safetensors", "--data", "{R}/data",
                         "--device", "tpu", "--output", "{RUN}"], ["tpu"]),
    ("eval-encoder-only", ["eval", "--checkpoint", "{R}/encoder.safetensors", "--data",
                           "{R}/data", "--output", "{RUN}"], ["no classifier head"]),
    ("eval-garbage-checkpoint", ["eval", "--checkpoint", "{R}/garbage.pt", "--data", "{R}/data",
                                 "--output", "{RUN}"], ["garbage.pt"]),
    ("eval-evil-pickle", ["eval", "--checkpoint", "{R}/evil.pt", "--data", "{R}/data",
                          "--output", "{RUN}"], ["evil.pt", "--trust-pickle"]),
    ("eval-missing-data", ["eval", "--checkpoint", "{R}/clf.safetensors", "--data",
                           "{R}/nowhere", "--output", "{RUN}"], ["nowhere"]),
    ("eval-no-val-folder", ["eval", "--checkpoint", "{R}/clf.safetensors", "--data",
                            "{R}/train_only", "--output", "{RUN}"], ["val"]),
    ("eval-bad-split", ["eval", "--checkpoint", "{R}/clf.safetensors", "--data", "{R}/data",
                        "--split", "holdout"], ["--split", "holdout"]),
    ("eval-unwritable-output", ["eval", "--checkpoint", "{R}/clf.safetensors", "--data",
                                "{R}/data", "--output", "{R}/a-file/eval"], ["a-file"]),
    # predict
    ("predict-non-image", ["predict", "--checkpoint", "{R}/clf.safetensors",
                           "{R}/not_an_image.png"], ["not_an_image.png", "not an image"]),
    ("predict-truncated-png", ["predict", "--checkpoint", "{R}/clf.safetensors",
                               "{R}/truncated.png"], ["truncated.png"]),
    ("predict-truncated-jpeg", ["predict", "--checkpoint", "{R}/clf.safetensors",
                                "{R}/truncated.jpg"], ["truncated.jpg"]),
    ("predict-encoder-only", ["predict", "--checkpoint", "{R}/encoder.safetensors",
                              "{R}/whole.jpg"], ["no classifier head"]),
    ("predict-missing-image", ["predict", "--checkpoint", "{R}/clf.safetensors",
                               "{R}/nowhere.png"], ["nowhere.png"]),
    ("predict-empty-folder", ["predict", "--checkpoint", "{R}/clf.safetensors",
                              "{R}/empty_folder"], ["empty_folder", "no image"]),
    ("predict-device-tpu", ["predict", "--checkpoint", "{R}/clf.safetensors", "--device", "tpu",
                            "{R}/whole.jpg"], ["tpu"]),
    ("predict-topk-0", ["predict", "--checkpoint", "{R}/clf.safetensors", "--topk", "0",
                        "{R}/whole.jpg"], ["--topk"]),
    ("predict-checkpoint-is-an-image", ["predict", "--checkpoint", "{R}/not_an_image.png",
                                        "{R}/whole.jpg"], ["not_an_image.png", "cannot read"]),
    ("predict-img-size-below-stride", ["predict", "--checkpoint", "{R}/clf.safetensors",
                                       "--img-size", "7", "{R}/whole.jpg"], ["--img-size 7"]),
    ("predict-img-size-huge", ["predict", "--checkpoint", "{R}/clf.safetensors", "--img-size",
                               "100000", "{R}/whole.jpg"], ["--img-size 100000"]),
    ("predict-evil-pickle", ["predict", "--checkpoint", "{R}/evil.pt", "{R}/whole.jpg"],
     ["evil.pt"]),
    # export
    ("export-unwritable-folder", ["export", "--checkpoint", "{R}/clf.safetensors", "--format",
                                  "torchscript", "{R}/a-file/model.pt"], ["a-file"]),
    ("export-encoder-only", ["export", "--checkpoint", "{R}/encoder.safetensors", "--format",
                             "torchscript", "{R}/e.pt"], ["no classifier head"]),
    ("export-bad-format", ["export", "--checkpoint", "{R}/clf.safetensors", "--format", "tflite",
                           "{R}/m.tfl"], ["--format", "tflite"]),
    ("export-atol-0", ["export", "--checkpoint", "{R}/clf.safetensors", "--format",
                       "torchscript", "--atol", "0", "{R}/m.pt"], ["--atol"]),
    ("export-opset-3", ["export", "--checkpoint", "{R}/clf.safetensors", "--format", "onnx",
                        "--opset", "3", "{R}/m.onnx"], ["--opset 3"]),
    ("export-onto-a-folder", ["export", "--checkpoint", "{R}/clf.safetensors", "--format",
                              "onnx", "{R}/empty_folder"], ["empty_folder", "is a folder"]),
    ("export-missing-checkpoint", ["export", "--checkpoint", "{R}/nowhere.safetensors",
                                   "--format", "onnx", "{R}/m.onnx"], ["nowhere.safetensors"]),
    # analyze
    ("analyze-missing-checkpoint", ["analyze", "collapse", "--checkpoint", "{R}/nowhere.pt",
                                    "--data", "{R}/data", "--output", "{RUN}"], ["nowhere.pt"]),
    ("analyze-missing-data", ["analyze", "collapse", "--checkpoint", "{R}/clf.safetensors",
                              "--data", "{R}/nowhere", "--output", "{RUN}"], ["nowhere"]),
    ("analyze-zero-images", ["analyze", "collapse", "--checkpoint", "{R}/clf.safetensors",
                             "--data", "{R}/data", "--images", "0", "--img-size", "32",
                             "--output", "{RUN}"], ["--images"]),
    ("analyze-non-image", ["analyze", "activations", "--checkpoint", "{R}/clf.safetensors",
                           "--image", "{R}/not_an_image.png", "--layer", "stages.0",
                           "--output", "{R}/act.png"], ["not_an_image.png"]),
    ("analyze-unknown-layer", ["analyze", "activations", "--checkpoint", "{R}/clf.safetensors",
                               "--image", "{R}/whole.jpg", "--layer", "stages.9", "--img-size",
                               "32", "--output", "{R}/act.png"], ["stages.9"]),
    ("analyze-batch-size-0", ["analyze", "collapse", "--checkpoint", "{R}/clf.safetensors",
                              "--data", "{R}/data", "--batch-size", "0", "--output", "{RUN}"],
     ["--batch-size"]),
    ("analyze-output-below-a-file", ["analyze", "collapse", "--checkpoint", "{R}/clf.safetensors",
                                     "--data", "{R}/data", "--output", "{R}/a-file/c"],
     ["--output", "a-file"]),
    ("analyze-max-channels-0", ["analyze", "activations", "--checkpoint", "{R}/clf.safetensors",
                                "--image", "{R}/whole.jpg", "--layer", "stem",
                                "--max-channels", "0", "--output", "{R}/act.png"],
     ["--max-channels"]),
    ("analyze-no-subcommand", ["analyze", "sideways"], ["sideways"]),
    # reconstruct
    ("reconstruct-non-image", ["reconstruct", "--checkpoint", "{R}/fcmae.safetensors",
                               "--img-size", "32", "{R}/not_an_image.png"], ["not_an_image.png"]),
    ("reconstruct-truncated", ["reconstruct", "--checkpoint", "{R}/fcmae.safetensors",
                               "--img-size", "32", "{R}/truncated.png"], ["truncated.png"]),
    ("reconstruct-mask-ratio", ["reconstruct", "--checkpoint", "{R}/fcmae.safetensors",
                                "--mask-ratio", "1.5", "{R}/whole.jpg"], ["--mask-ratio"]),
    ("reconstruct-size-off-patch", ["reconstruct", "--checkpoint", "{R}/fcmae.safetensors",
                                    "--img-size", "30", "{R}/whole.jpg"], ["--img-size"]),
    ("reconstruct-garbage-checkpoint", ["reconstruct", "--checkpoint", "{R}/garbage.pt",
                                        "--img-size", "32", "{R}/whole.jpg"], ["garbage.pt"]),
    ("reconstruct-evil-pickle", ["reconstruct", "--checkpoint", "{R}/evil.pt", "--img-size",
                                 "32", "{R}/whole.jpg"], ["evil.pt", "code"]),
    ("reconstruct-output-below-a-file", ["reconstruct", "--checkpoint", "{R}/fcmae.safetensors",
                                         "--img-size", "32", "--output", "{R}/a-file/r.png",
                                         "{R}/whole.jpg"], ["a-file"]),
    ("reconstruct-missing-checkpoint", ["reconstruct", "--checkpoint", "{R}/nowhere.safetensors",
                                        "{R}/whole.jpg"], ["nowhere.safetensors"]),
    # bench
    ("bench-device-tpu", ["bench", "--device", "tpu"], ["tpu"]),
    ("bench-unknown-model", ["bench", "--model", "nope", "--device", "cpu"], ["nope"]),
    ("bench-fp16-on-cpu", ["bench", "--amp", "fp16", "--device", "cpu"], ["fp16"]),
    ("bench-batch-0", ["bench", "--batch", "0", "--device", "cpu"], ["--batch"]),
    # demo
    ("demo-output-below-a-file", ["demo", "--quick", "--output", "{R}/a-file/demo"], ["a-file"]),
    ("demo-threads-negative", ["demo", "--quick", "--threads", "-1", "--output", "{R}/demo"],
     ["--threads"]),
    # no such command at all
    ("unknown-command", ["train"], ["train"]),
]


def _argv(template, w, out: Path | None = None) -> list[str]:
    out = out or w["root"] / "unused-output"
    return [a.replace("{RUN}", str(w["run"])).replace("{OUT}", str(out))
            .replace("{R}", str(w["root"])) for a in template]


def _one_error_line(err: str, words) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in: {lines[0]}"
    return lines[0]


def _refused(argv, capsys, words, code: int = 2) -> str:
    """Run one command in-process and check it ended as a refusal should: exit ``code``, one
    line on stderr holding every word in ``words``, no traceback. Returns that line."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse exits by itself
        rc = e.code
    captured = capsys.readouterr()
    assert rc == code, (rc, captured.err[-2000:])
    return _one_error_line(captured.err, words)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_exit_2_and_one_line(case, w, capsys):
    case_id, template, words = case
    before = _hash_tree(w["run"])
    out = w["root"] / "fresh" / case_id
    _refused(_argv(template, w, out), capsys, words)
    assert _hash_tree(w["run"]) == before, "the existing run folder was changed"
    assert not out.exists() or not _hash_tree(out), f"files left in {out}: {list(_hash_tree(out))}"
    assert not (w["root"] / "PWNED").exists()  # no pickled code ever ran


SUBPROCESS_CASES = [
    ("predict-non-image", ["not an image"]),
    ("finetune-aa-bogus", ["--aa", "bogus"]),
    ("eval-device-tpu", ["tpu"]),
    ("convert-evil-pickle", ["--trust-pickle"]),
]


@pytest.mark.parametrize("name,words", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_the_real_entry_point_behaves_the_same(name, words, w):
    template = next(argv for case_id, argv, _ in CASES if case_id == name)
    before = _hash_tree(w["run"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "convnextv2", *_argv(template, w)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    _one_error_line(proc.stderr, words)
    assert _hash_tree(w["run"]) == before


def test_eval_warns_when_the_class_names_differ_from_the_checkpoint(w, capsys, tmp_path):
    for split in ("train", "val"):
        for i in range(4):
            _png(tmp_path / "pets" / split / ("dog" if i % 2 else "cat") / f"{i}.png", seed=i)
    argv = ["eval", "--checkpoint", str(w["root"] / "clf.safetensors"), "--img-size", "32",
            "--json", "--output", str(tmp_path / "ev")]
    assert main([*argv, "--data", str(w["root"] / "data")]) == 0  # classes a, b: as stored
    assert capsys.readouterr().err == ""
    assert main([*argv, "--data", str(tmp_path / "pets")]) == 0
    captured = capsys.readouterr()
    line = _one_error_line(captured.err, ["warning", "differ", "'cat'", "'a'"])
    assert line.startswith("convnextv2 eval: warning:")
    assert json.loads(captured.out)["count"] == 4


# -- training commands: refused resumes and training failures ---------------------------------
TINY = [*TOY_FLAGS, "--workers", "0",
        "--no-progress", "--device", "cpu", "--batch-size", "2"]
DET = ["detect", "train", "--data", "{SCENES}/detection", *TINY, "--img-size", "64",
       "--fpn-channels", "16", "--box-head-dim", "32", "--mask-head-dim", "8", "--anchor-sizes",
       "8", "16", "32", "64", "128"]
SEG = ["segment", "train", "--data", "{SCENES}/segmentation", *TINY, "--crop", "48",
       "--channels", "16", "--aux-channels", "8"]

# (id, argv, exit status, words the one stderr line must contain). {DET} and {SEG} are runs
# of one step made by the fixture with DET / SEG as they are; they must not change.
TRAINING_CASES = [
    ("detect-existing-run", [*DET, "--output", "{DET}"], 2, ["--resume auto", "--overwrite"]),
    ("segment-existing-run", [*SEG, "--output", "{SEG}"], 2, ["--resume auto", "--overwrite"]),
    ("detect-resume-other-img-size", [*DET, "--output", "{DET}", "--resume", "auto",
                                      "--img-size", "96"], 2, ["--resume auto", "img_size"]),
    ("detect-resume-other-seed", [*DET, "--output", "{DET}", "--resume", "auto", "--seed", "5"],
     2, ["--resume auto", "seed (0 -> 5)"]),
    ("segment-resume-other-crop", [*SEG, "--output", "{SEG}", "--resume", "auto", "--crop",
                                   "32"], 2, ["--resume auto", "crop (48 -> 32)"]),
    ("segment-resume-other-backbone", [*SEG, "--output", "{SEG}", "--resume", "auto", "--dims",
                                       "8", "16", "24", "48"], 2, ["--resume auto", "dims"]),
    ("segment-resume-and-overwrite", [*SEG, "--output", "{SEG}", "--resume", "auto",
                                      "--overwrite"], 2, ["--overwrite", "--resume"]),
    ("detect-keep-last-negative", [*DET, "--output", "{OUT}", "--keep-last", "-1"], 2,
     ["--keep-last"]),
    ("detect-accum-steps-0", [*DET, "--output", "{OUT}", "--accum-steps", "0"], 2,
     ["--accum-steps"]),
    ("segment-warmup-steps-negative", [*SEG, "--output", "{OUT}", "--warmup-steps", "-5"], 2,
     ["--warmup-steps"]),
    ("segment-drop-path-1", [*SEG, "--output", "{OUT}", "--drop-path", "1"], 2, ["--drop-path"]),
    ("detect-layer-decay-0", [*DET, "--output", "{OUT}", "--layer-decay", "0"], 2,
     ["--layer-decay"]),
    ("detect-missing-data", [*DET[:3], "{R}/nowhere", *DET[4:], "--output", "{OUT}"], 2,
     ["nowhere"]),
    ("segment-fp16-on-cpu", [*SEG, "--output", "{OUT}", "--amp", "fp16"], 2, ["fp16"]),
    ("segment-no-fsdp", [*SEG, "--output", "{OUT}", "--fsdp"], 2, ["--fsdp"]),
    ("detect-output-below-a-file", [*DET, "--output", "{R}/a-file/run"], 2, ["a-file"]),
    # a loss that becomes NaN/inf: exit 1, one line naming the step and the last checkpoint
    ("detect-lr-1e6", [*DET, "--output", "{OUT}", "--lr", "1e6", "--warmup-steps", "0",
                       "--max-steps", "6"], 1,
     ["non-finite loss", "optimizer step", "no checkpoint had been written yet"]),
    ("segment-lr-1e6", [*SEG, "--output", "{OUT}", "--lr", "1e6", "--warmup-steps", "0",
                        "--max-steps", "6", "--save-every-steps", "1"], 1,
     ["non-finite loss", "optimizer step", "checkpoint-00000001.pt"]),
    ("pretrain-lr-1e6", [*PRE, "--data", "{R}/data/train", "--output", "{OUT}", "--lr", "1e6",
                         "--warmup-steps", "0", "--epochs", "3"], 1,
     ["convnextv2 pretrain: stopped", "non-finite loss", "optimizer step"]),
    ("finetune-lr-1e6", [*FT, "--data", "{R}/data", "--output", "{OUT}", "--lr", "1e6",
                         "--warmup-steps", "0", "--epochs", "3"], 1,
     ["convnextv2 finetune: stopped", "non-finite loss", "optimizer step"]),
]


@pytest.fixture(scope="module")
def transfer_runs(w) -> dict[str, Path]:
    """Synthetic scenes and a one-step ``detect train`` and ``segment train`` run on them."""
    from convnextv2.transfer.synthetic import write_synthetic

    write_synthetic(w["root"] / "scenes", n_train=4, n_val=1, size=64, seed=1)
    runs = {"{DET}": w["root"] / "det_run", "{SEG}": w["root"] / "seg_run"}
    for argv, run in ((DET, runs["{DET}"]), (SEG, runs["{SEG}"])):
        assert main([*_transfer_argv(argv, w, runs), "--output", str(run), "--max-steps",
                     "1"]) == 0
    return runs


def _transfer_argv(template, w, runs, out: Path | None = None) -> list[str]:
    argv = _argv(template, w, out)
    for key, run in {**runs, "{SCENES}": w["root"] / "scenes"}.items():
        argv = [a.replace(key, str(run)) for a in argv]
    return argv


@pytest.mark.parametrize("case", TRAINING_CASES, ids=[c[0] for c in TRAINING_CASES])
def test_training_commands_refuse_and_stop_in_one_line(case, w, transfer_runs, capsys):
    case_id, template, code, words = case
    before = {key: _hash_tree(run) for key, run in transfer_runs.items()}
    out = w["root"] / "fresh" / case_id
    _refused(_transfer_argv(template, w, transfer_runs, out), capsys, words, code=code)
    assert {key: _hash_tree(run) for key, run in transfer_runs.items()} == before
    if code == 2:  # a refused run writes nothing; a failed one keeps its logs for a look
        assert not out.exists() or not _hash_tree(out), f"files left in {out}"


# -- the same options in every training command ------------------------------------------------
TRAINING_COMMANDS = {
    "pretrain": ["pretrain", "--output", "o"],
    "finetune": ["finetune", "--data", "d", "--output", "o"],
    "detect train": ["detect", "train", "--data", "d", "--output", "o"],
    "segment train": ["segment", "train", "--data", "d", "--output", "o"],
}
SHARED_DEFAULTS = dict(resume=None, overwrite=False, log_dir=None, accum_steps=1,
                       save_every_steps=0, keep_last=3, max_steps=None, warmup_steps=None,
                       drop_path=None, amp="none", compile=False, seed=0, deterministic=False,
                       device=None, progress=True)


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_every_training_command_has_the_shared_options_and_defaults(command):
    from convnextv2.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(TRAINING_COMMANDS[command])
    assert {k: getattr(args, k) for k in SHARED_DEFAULTS} == SHARED_DEFAULTS
    given = parser.parse_args([*TRAINING_COMMANDS[command], "--resume", "auto", "--log-dir", "tb",
                               "--accum-steps", "4", "--save-every-steps", "7", "--keep-last",
                               "2", "--max-steps", "9", "--warmup-steps", "5", "--drop-path",
                               "0.2", "--amp", "bf16", "--compile"])
    assert (given.resume, given.log_dir, given.accum_steps, given.save_every_steps,
            given.keep_last, given.max_steps, given.warmup_steps, given.drop_path, given.amp,
            given.compile) == ("auto", "tb", 4, 7, 2, 9, 5, 0.2, "bf16", True)


@pytest.mark.parametrize("command,old,value,dest", [
    ("pretrain", "--decoder-embed-dim", "32", "decoder_dim"),
    ("pretrain", "--accum-iter", "2", "accum_steps"),
    ("finetune", "--accum-iter", "2", "accum_steps"),
    ("finetune", "--drop-path-rate", "0.3", "drop_path"),
    ("detect train", "--save-interval", "5", "save_every_steps"),
    ("detect train", "--warmup-iters", "5", "warmup_steps"),
    ("segment train", "--warmup-iters", "5", "warmup_steps"),
    ("segment train", "--accum-iter", "2", "accum_steps"),
    ("segment train", "--eval-interval", "5", None),  # evaluation is per epoch now: ignored
])
def test_old_option_names_still_work_and_say_their_new_name(command, old, value, dest, capsys):
    from convnextv2.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([*TRAINING_COMMANDS[command][:len(command.split())], "--help"])
    assert old not in capsys.readouterr().out  # hidden from the help
    args = parser.parse_args([*TRAINING_COMMANDS[command], old, value])
    line = _one_error_line(capsys.readouterr().err, [old, "deprecated"])
    if dest is None:
        assert "ignored" in line
    else:
        assert getattr(args, dest) == type(getattr(args, dest))(value)
        assert f"--{dest.replace('_', '-')}" in line


# -- --grad-checkpointing (issue 22) -------------------------------------------------------------
@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_grad_checkpointing_option_in_every_training_command(command):
    from convnextv2.cli import build_parser

    parser = build_parser()
    argv = TRAINING_COMMANDS[command]
    assert parser.parse_args(argv).grad_checkpointing is None
    assert parser.parse_args([*argv, "--grad-checkpointing"]).grad_checkpointing == "block"
    assert parser.parse_args([*argv, "--grad-checkpointing", "stage"]).grad_checkpointing == "stage"


GRAD_CHECKPOINTING_CASES = [(command, [*argv, "--grad-checkpointing", "layer"])
                            for command, argv in TRAINING_COMMANDS.items()]


@pytest.mark.parametrize("command,argv", GRAD_CHECKPOINTING_CASES,
                         ids=[c[0] for c in GRAD_CHECKPOINTING_CASES])
def test_grad_checkpointing_bad_granularity_is_one_line(command, argv, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    _one_error_line(capsys.readouterr().err, ["--grad-checkpointing", "layer", "block", "stage"])
    assert not any(tmp_path.iterdir())


# -- segment: hostile input (issue 21) ----------------------------------------------------------
def _seg_variant(source: Path, folder: Path, change) -> Path:
    """A copy of the ADE20K-layout scenes at ``source`` with ``change(copy)`` applied."""
    import shutil

    shutil.copytree(source, folder)
    change(folder)
    return folder


@pytest.fixture(scope="module")
def seg_data(w, transfer_runs) -> dict[str, Path]:
    """Broken variants of the segmentation scenes, and loose images for ``predict``."""
    from conftest import write_png_header

    src, root = w["root"] / "scenes" / "segmentation", w["root"] / "seg_variants"
    first = "scene_00000"

    def huge(d: Path):
        (d / "images" / "training" / f"{first}.jpg").unlink()
        write_png_header(d / "images" / "training" / f"{first}.png", 20000, 20000)
        write_png_header(d / "annotations" / "training" / f"{first}.png", 20000, 20000)

    def cut(path: Path):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])

    def three_classes(d: Path):
        (d / "classes.txt").write_text("a\nb\nc\n")

    def bad_val_mask(d: Path):  # value 40 in an 11-class mask (1..11 allowed)
        Image.fromarray(np.full((64, 64), 40, np.uint8), "L").save(
            d / "annotations" / "validation" / f"{first}.png")

    def deep_val_mask(d: Path):  # a 16-bit mask: its values are read as they are (300)
        Image.fromarray(np.full((64, 64), 300, np.uint16)).save(
            d / "annotations" / "validation" / f"{first}.png")

    loose = root / "loose"
    loose.mkdir(parents=True)
    write_png_header(loose / "huge.png", 20000, 20000)
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(loose / "tiny.png")
    Image.fromarray(np.zeros((1, 5000, 3), np.uint8)).save(loose / "strip.png")
    return {"{SEG_HUGE}": _seg_variant(src, root / "huge", huge),
            "{SEG_CUT_IMAGE}": _seg_variant(
                src, root / "cut_image", lambda d: cut(d / "images/validation" / f"{first}.jpg")),
            "{SEG_CUT_MASK}": _seg_variant(
                src, root / "cut_mask",
                lambda d: cut(d / "annotations/validation" / f"{first}.png")),
            "{SEG_3_CLASSES}": _seg_variant(src, root / "three", three_classes),
            "{SEG_BAD_VAL_MASK}": _seg_variant(src, root / "bad_val", bad_val_mask),
            "{SEG_DEEP_VAL_MASK}": _seg_variant(src, root / "deep_val", deep_val_mask),
            "{LOOSE}": loose}


def _seg_train(data: str) -> list[str]:
    return [*SEG[:3], data, *SEG[4:], "--output", "{OUT}"]


SEG_PREDICT = ["segment", "predict", "--checkpoint", "{SEG}/model.pt", "--device", "cpu"]
SEG_EVAL = ["segment", "eval", "--checkpoint", "{SEG}/model.pt", "--device", "cpu",
            "--workers", "0", "--no-progress"]
SEG_HOSTILE = [
    ("segment-train-20000px-png", _seg_train("{SEG_HUGE}"), 2,
     ["scene_00000.png", "20000x20000", "--max-image-pixels"]),
    ("segment-predict-20000px-png", [*SEG_PREDICT, "{LOOSE}/huge.png", "--output", "{OUT}"], 2,
     ["huge.png", "20000x20000", "--max-image-pixels"]),
    ("segment-predict-max-image-pixels-0", [*SEG_PREDICT, "{LOOSE}/huge.png", "--output",
                                            "{OUT}", "--max-image-pixels", "0"], 2,
     ["--max-image-pixels", ">= 1"]),
    ("segment-train-crop-7", [*_seg_train("{SCENES}/segmentation"), "--crop", "7"], 2,
     ["--crop 7", "stride 32"]),
    ("segment-train-channels-0", [*_seg_train("{SCENES}/segmentation"), "--channels", "0"], 2,
     ["--channels", ">= 1"]),
    ("segment-train-num-classes-0", [*_seg_train("{SCENES}/segmentation"), "--num-classes",
                                     "0"], 2, ["--num-classes", ">= 1"]),
    # the training options the detect rows check, through segment train too
    ("segment-train-layer-decay-0", [*_seg_train("{SCENES}/segmentation"), "--layer-decay",
                                     "0"], 2, ["--layer-decay", "(0, 1]"]),
    ("segment-train-layer-decay-2", [*_seg_train("{SCENES}/segmentation"), "--layer-decay",
                                     "2"], 2, ["--layer-decay", "(0, 1]"]),
    ("segment-train-max-steps-0", [*_seg_train("{SCENES}/segmentation"), "--max-steps", "0"],
     2, ["--max-steps", ">= 1"]),
    ("segment-train-drop-path-1.5", [*_seg_train("{SCENES}/segmentation"), "--drop-path",
                                     "1.5"], 2, ["--drop-path", "[0, 1)"]),
    ("segment-train-ratio-range-inverted", [*_seg_train("{SCENES}/segmentation"),
                                            "--ratio-range", "2", "0.5"], 2,
     ["--ratio-range 2 0.5", "MIN <= MAX"]),
    ("segment-train-ratio-range-0", [*_seg_train("{SCENES}/segmentation"), "--ratio-range",
                                     "0", "1"], 2, ["--ratio-range 0 1", "0 < MIN"]),
    ("segment-train-scale-inverted", [*_seg_train("{SCENES}/segmentation"), "--scale", "512",
                                      "128"], 2, ["--scale 512 128", "SHORT <= LONG"]),
    ("segment-eval-missing-checkpoint", [*SEG_EVAL[:2], "--checkpoint", "{R}/nowhere.pt",
                                         *SEG_EVAL[4:], "--data", "{SCENES}/segmentation"], 2,
     ["nowhere.pt", "no such file"]),
    ("segment-eval-missing-data", [*SEG_EVAL, "--data", "{R}/nowhere"], 2, ["nowhere"]),
    ("segment-predict-missing-image", [*SEG_PREDICT, "{LOOSE}/nope.png", "--output", "{OUT}"],
     2, ["nope.png"]),
    ("segment-eval-eval-size-7", [*SEG_EVAL, "--data", "{SCENES}/segmentation", "--eval-size",
                                  "7"], 2, ["--eval-size 7", "stride 32"]),
    ("segment-eval-stride-above-window", [*SEG_EVAL, "--data", "{SCENES}/segmentation",
                                          "--window", "48", "--stride", "64"], 2,
     ["--stride 64", "--window 48"]),
    ("segment-eval-11-class-model-on-3-class-data", [*SEG_EVAL, "--data", "{SEG_3_CLASSES}"],
     2, ["3 classes", "trained on 11"]),
    ("segment-eval-truncated-image", [*SEG_EVAL, "--data", "{SEG_CUT_IMAGE}"], 2,
     ["scene_00000.jpg"]),
    ("segment-eval-truncated-mask", [*SEG_EVAL, "--data", "{SEG_CUT_MASK}"], 2,
     ["scene_00000.png"]),
    ("segment-train-truncated-val-mask", _seg_train("{SEG_CUT_MASK}"), 2,
     ["scene_00000.png"]),
    ("segment-train-bad-val-mask-before-training", _seg_train("{SEG_BAD_VAL_MASK}"), 2,
     ["scene_00000.png", "[40]", "outside the class range"]),
    ("segment-train-16-bit-val-mask", _seg_train("{SEG_DEEP_VAL_MASK}"), 2,
     ["scene_00000.png", "[300]"]),
    # (a 3x3 image is fine: the test resize takes its short side to the model's 48 px)
    ("segment-predict-1x5000-image", [*SEG_PREDICT, "{LOOSE}/strip.png", "--output", "{OUT}"],
     2, ["strip.png", "5000x1", "at least 32"]),
    ("segment-predict-mode-bogus", [*SEG_PREDICT, "{LOOSE}/tiny.png", "--output", "{OUT}",
                                    "--mode", "tiles"], 2, ["--mode", "slide", "whole"]),
    ("segment-predict-label-png-is-a-file", [*SEG_PREDICT, "{SCENES}/segmentation/images/"
                                             "validation", "--output", "{OUT}", "--label-png",
                                             "{SCENES}/segmentation/classes.txt"], 2,
     ["--label-png"]),
    # a loss that becomes NaN/inf: exit 1, one line (the engine's own row is segment-lr-1e6)
    ("segment-train-nonfinite-loss", [*_seg_train("{SCENES}/segmentation"), "--lr", "1e6",
                                      "--warmup-steps", "0", "--max-steps", "4"], 1,
     ["non-finite loss"]),
]


@pytest.mark.parametrize("case", SEG_HOSTILE, ids=[c[0] for c in SEG_HOSTILE])
def test_segment_refuses_hostile_input_in_one_line(case, w, transfer_runs, seg_data, capsys):
    # the training table's check, with the broken data folders among the folders that must
    # not change
    test_training_commands_refuse_and_stop_in_one_line(case, w, {**transfer_runs, **seg_data},
                                                       capsys)


# -- released weights by name (issue 22): unreleased tags, no network, torn downloads ----------
# Every command that takes a checkpoint takes a released name; its failures are one line too.
# The Hub and the official URL are cut off (a closed port); "{TORN}" rows get a local server
# that sends half of convnextv2_femto.fcmae.
NAMES_OFFLINE = ["timm/convnextv2_atto.fcmae", "dl.fbaipublicfiles.com", "pass the file"]
RELEASED_NAME_CASES = [
    ("finetune-unreleased-tag", [*FT, "--data", "{R}/data", "--output", "{OUT}", "--finetune",
                                 "convnextv2_atto.fcmae_ft_in22k_in1k"],
     ["fcmae_ft_in22k_in1k", "released: fcmae, fcmae_ft_in1k"]),
    ("eval-unreleased-tag", ["eval", "--checkpoint", "convnextv2_tiny.in1k", "--data",
                             "{R}/data"], ["'in1k'", "fcmae_ft_in22k_in1k_384"]),
    ("predict-offline", ["predict", "--checkpoint", "convnextv2_atto.fcmae", "{R}/whole.jpg"],
     NAMES_OFFLINE),
    ("finetune-offline", [*FT, "--data", "{R}/data", "--output", "{OUT}", "--finetune",
                          "convnextv2_atto.fcmae"], NAMES_OFFLINE),
    ("pretrain-init-offline", [*PRE, "--data", "{R}/data/train", "--output", "{OUT}", "--init",
                               "timm/convnextv2_atto.fcmae"], NAMES_OFFLINE),
    ("detect-pretrained-offline", [*DET, "--output", "{OUT}", "--pretrained",
                                   "convnextv2_atto.fcmae"], NAMES_OFFLINE),
    ("segment-pretrained-unreleased", [*SEG, "--output", "{OUT}", "--pretrained",
                                       "convnextv2_huge.fcmae_ft_in22k_in1k"],
     ["huge", "fcmae_ft_in22k_in1k_512"]),
    ("finetune-torn-download", [*FT, "--data", "{R}/data", "--output", "{OUT}", "--finetune",
                                "convnextv2_femto.fcmae", "{TORN}"],
     ["truncated", "convnextv2_femto_1k_224_fcmae.pt"]),
    ("analyze-offline", ["analyze", "collapse", "--checkpoint", "convnextv2_atto.fcmae",
                         "--data", "{R}/data", "--output", "{OUT}"], NAMES_OFFLINE),
    ("export-unreleased-tag", ["export", "--checkpoint", "convnextv2_pico.fcmae_ft_in22k_in1k",
                               "--format", "onnx", "{OUT}/m.onnx"], ["pico", "fcmae_ft_in1k"]),
    ("convert-offline", ["convert", "convnextv2_atto.fcmae", "{OUT}/atto.safetensors"],
     NAMES_OFFLINE),
    ("info-pretrained-no-match", ["info", "--pretrained", "resnet50"], ["resnet50"]),
]


@pytest.mark.parametrize("case", RELEASED_NAME_CASES, ids=[c[0] for c in RELEASED_NAME_CASES])
def test_released_names_fail_in_one_line(case, w, transfer_runs, capsys, monkeypatch,
                                         tmp_path):
    from conftest import LocalFileServer, unreachable_weight_sources

    case_id, template, words = case
    unreachable_weight_sources(monkeypatch, tmp_path)
    server = None
    if "{TORN}" in template:
        template = [a for a in template if a != "{TORN}"]
        server = LocalFileServer()
        server.files["/pt_only/convnextv2_femto_1k_224_fcmae.pt"] = b"PK" + bytes(4000)
        server.truncate.update(server.files)
        monkeypatch.setenv("CONVNEXTV2_WEIGHTS_URL", server.url)
    before = {key: _hash_tree(run) for key, run in {**transfer_runs, "run": w["run"]}.items()}
    out = w["root"] / "fresh" / case_id
    try:
        _refused(_transfer_argv(template, w, transfer_runs, out), capsys, words)
    finally:
        if server:
            server.close()
    assert {key: _hash_tree(run) for key, run in {**transfer_runs, "run": w["run"]}.items()} \
        == before
    assert not out.exists() or not _hash_tree(out), f"files left in {out}"
    assert not list((tmp_path / "cache").glob("*")), "a torn download was cached"


# -- replayable runs, the SLURM launcher, the pretraining monitor (issue 23) -------------------
# (id, files written first under {T}, argv, words the one line must hold)
REPLAY_LAUNCH_MONITOR_HOSTILE = [
    ("config-missing", {}, ["pretrain", "--config", "{T}/none.yaml", "--output", "{T}/o"],
     ["--config", "cannot read"]),
    ("config-unknown-key", {"c.yaml": "epochs: 1\nlearning_rate: 0.1\n"},
     ["pretrain", "--config", "{T}/c.yaml", "--output", "{T}/o"], ["learning_rate", "unknown"]),
    ("config-bad-type", {"c.yaml": "batch_size: big\n"},
     ["finetune", "--config", "{T}/c.yaml", "--data", "builtin", "--output", "{T}/o"],
     ["batch_size", "integer"]),
    ("config-bad-choice", {"c.yaml": "amp: fp8\n"},
     ["detect", "train", "--config", "{T}/c.yaml", "--data", "builtin", "--output", "{T}/o"],
     ["amp", "bf16"]),
    ("config-not-yaml", {"c.yaml": "epochs: [1\n"},
     ["segment", "train", "--config", "{T}/c.yaml", "--data", "builtin", "--output", "{T}/o"],
     ["not valid YAML"]),
    ("config-a-list", {"c.yaml": "- 1\n- 2\n"},
     ["pretrain", "--config", "{T}/c.yaml", "--output", "{T}/o"], ["mapping"]),
    ("launch-no-command", {}, ["launch", "slurm", "--dry-run"], ["training command", "pretrain"]),
    ("launch-not-training", {}, ["launch", "slurm", "--dry-run", "--", "eval", "--output", "x"],
     ["eval", "finetune"]),
    ("launch-bad-time", {}, ["launch", "slurm", "--time", "soon", "--dry-run", "--", "pretrain",
                             "--output", "{T}/o"], ["--time", "H:MM:SS"]),
    ("launch-zero-nodes", {}, ["launch", "slurm", "--nodes", "0", "--dry-run", "--", "pretrain",
                               "--output", "{T}/o"], ["--nodes", ">= 1"]),
    ("launch-bad-mem", {}, ["launch", "slurm", "--mem", "lots", "--dry-run", "--", "pretrain",
                            "--output", "{T}/o"], ["--mem", "64G"]),
    ("launch-bad-training-option", {}, ["launch", "slurm", "--dry-run", "--", "pretrain",
                                        "--epochs", "x", "--output", "{T}/o"], ["--epochs"]),
    ("launch-no-slurm", {}, ["launch", "slurm", "--", "pretrain", "--output", "{T}/o"],
     ["srun", "--dry-run"]),
    ("monitor-missing-folder", {}, ["pretrain", "--monitor-data", "{T}/none", "--output",
                                    "{T}/o"], ["--monitor-data", "none"]),
    ("monitor-unlabelled", {"plain/a.txt": "not an image"},
     ["pretrain", "--monitor-data", "{T}/plain", "--output", "{T}/o"], ["--monitor-data"]),
    ("monitor-every-zero", {}, ["pretrain", "--monitor-data", "builtin", "--monitor-every", "0",
                                "--output", "{T}/o"], ["--monitor-every", ">= 1"]),
    ("monitor-images-negative", {}, ["pretrain", "--monitor-data", "builtin",
                                     "--monitor-images", "-3", "--output", "{T}/o"],
     ["--monitor-images", ">= 1"]),
    ("monitor-with-fsdp", {}, ["pretrain", "--monitor-data", "builtin", "--fsdp", "--output",
                               "{T}/o"], ["--monitor-data", "--fsdp"]),
]


@pytest.mark.parametrize("case", REPLAY_LAUNCH_MONITOR_HOSTILE,
                         ids=[c[0] for c in REPLAY_LAUNCH_MONITOR_HOSTILE])
def test_replay_launch_monitor_hostile_input(case, tmp_path, capsys):
    if case[0].startswith("launch"):
        pytest.importorskip("submitit")
    case_id, files, template, words = case
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = _hash_tree(tmp_path)
    _refused([a.replace("{T}", str(tmp_path)) for a in template], capsys, words)
    assert _hash_tree(tmp_path) == before, "files were written or changed"


# -- tar shards and file lists (convnextv2 shards, --data shards/lists) -------------------------
@pytest.fixture(scope="module")
def shard_world(tmp_path_factory) -> Path:
    """{S}: a small ImageFolder tree, its shards (train/ and val/), a flat shard set without
    val, a junk tar, a truncated one, an empty folder and a list with a bad row."""
    from convnextv2.tools.shard_writer import write_shards

    root = tmp_path_factory.mktemp("shard_world")
    for split, n in (("train", 8), ("val", 4)):
        for i in range(n):
            _png(root / "tree" / split / "ab"[i % 2] / f"{i}.png", seed=i)
    write_shards(str(root / "tree"), root / "shards", 4, progress=False)
    write_shards(str(root / "tree" / "train"), root / "flat", 4, progress=False)
    good = (root / "shards" / "train" / "train-000000.tar").read_bytes()
    (root / "trunc.tar").write_bytes(good[:3000])
    (root / "junk.tar").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "empty").mkdir()
    (root / "bad.csv").write_text(f"path,label\n{root / 'tree/train/a/0.png'},a\n"
                                  f"{root / 'tree/train/a/0.png'},a,oops\n")
    (root / "missing.csv").write_text("path,label\nnot-there.png,a\n")
    (root / "lists").mkdir()
    (root / "lists" / "train.csv").write_text(f"{root / 'tree/train/a/0.png'},a\n")
    return root


SHARDS_HOSTILE = [
    ("shards-bad-brace-pattern", [*PRE, "--data", "{S}/flat/shards-{000..}.tar"],
     ["brace pattern"]),
    ("shards-missing-in-pattern", [*PRE, "--data", "{S}/flat/shards-{000000..000009}.tar"],
     ["do not exist", "shards-000002.tar"]),
    ("shards-empty-folder", [*PRE, "--data", "{S}/empty"], ["empty"]),
    ("shards-junk-tar", [*PRE, "--data", "{S}/junk.tar"], ["junk.tar", "not a readable tar"]),
    ("shards-truncated-tar", [*PRE, "--data", "{S}/trunc.tar"], ["trunc.tar", "not a readable tar"]),
    ("shards-missing-list", [*PRE, "--data", "{S}/nothing.txt"], ["nothing.txt", ".tar"]),
    ("shards-finetune-without-val", [*FT, "--data", "{S}/flat"],
     ["train/ and val/", "shards"]),
    ("shards-decode-device", [*PRE, "--data", "{S}/shards", "--decode", "device"],
     ["--decode device", "--decode cpu"]),
    ("list-bad-row", [*FT, "--data", "{S}/bad.csv"], ["bad.csv:3", "3 field(s)"]),
    ("list-missing-image", [*PRE, "--data", "{S}/missing.csv"], ["missing.csv:2", "no file"]),
    ("list-missing-val-list", [*FT, "--data", "{S}/lists/train.csv"],
     ["val.csv", "does not exist"]),
    ("shards-command-zero-size", ["shards", "{S}/tree", "{OUT}", "--shard-size", "0"],
     ["--shard-size", ">= 1"]),
    ("shards-command-out-not-empty", ["shards", "{S}/tree", "{S}/shards", "--shard-size", "2"],
     ["not empty", "--overwrite"]),
    ("shards-command-missing-src", ["shards", "{S}/nope", "{OUT}", "--shard-size", "2"],
     ["nope", "ImageFolder"]),
]


@pytest.mark.parametrize("case", SHARDS_HOSTILE, ids=[c[0] for c in SHARDS_HOSTILE])
def test_shards_and_lists_refuse_hostile_input_in_one_line(case, shard_world, capsys):
    case_id, template, words = case
    before = _hash_tree(shard_world)
    out = shard_world.parent / f"fresh-{case_id}"
    argv = [a.replace("{S}", str(shard_world)).replace("{OUT}", str(out)) for a in template]
    if "--output" not in argv and argv[0] != "shards":
        argv += ["--output", str(out)]
    _refused(argv, capsys, words)
    assert _hash_tree(shard_world) == before, "the inputs were changed"
    assert not out.exists() or not _hash_tree(out), f"files left in {out}"


# -- push (issue 22, item 4) -----------------------------------------------------------------------
# (id, argv, words the one error line must contain); {RUN} must not change, {OUT} stays empty
PUSH_HOSTILE = [
    ("push-missing-run", ["push", "{R}/no-such-run", "me/x", "--dry-run", "{OUT}"],
     ["no-such-run", "run folder"]),
    ("push-bad-repo-id", ["push", "{R}/clf.safetensors", "bad id!", "--dry-run", "{OUT}"],
     ["bad id!", "namespace/name"]),
    ("push-repo-id-three-parts", ["push", "{R}/clf.safetensors", "a/b/c", "--dry-run", "{OUT}"],
     ["a/b/c"]),
    ("push-bad-layout", ["push", "{R}/clf.safetensors", "me/x", "--layout", "onnx"],
     ["--layout", "onnx"]),
    ("push-bad-license", ["push", "{R}/clf.safetensors", "me/x", "--license", "My License",
                          "--dry-run", "{OUT}"], ["--license", "apache-2.0"]),
    ("push-dry-run-onto-a-run", ["push", "{R}/clf.safetensors", "me/x", "--dry-run", "{RUN}"],
     ["--dry-run", "not empty", "--overwrite"]),
    ("push-overwrite-a-run", ["push", "{R}/clf.safetensors", "me/x", "--dry-run", "{RUN}",
                              "--overwrite"], ["--dry-run", "metrics.jsonl", "push folder"]),
    ("push-dry-run-is-a-file", ["push", "{R}/clf.safetensors", "me/x", "--dry-run",
                                "{R}/a-file"], ["a-file", "folder"]),
    ("push-overwrite-without-dry-run", ["push", "{R}/clf.safetensors", "me/x", "--overwrite"],
     ["--overwrite", "--dry-run"]),
    ("push-garbage", ["push", "{R}/garbage.pt", "me/x", "--dry-run", "{OUT}"], ["garbage.pt"]),
    ("push-evil-pickle", ["push", "{R}/evil.pt", "me/x", "--dry-run", "{OUT}"], ["evil.pt"]),
    ("push-folder-without-weights", ["push", "{R}/empty_folder", "me/x", "--dry-run", "{OUT}"],
     ["empty_folder", "no weights"]),
]


@pytest.mark.parametrize("case", PUSH_HOSTILE, ids=[c[0] for c in PUSH_HOSTILE])
def test_push_refuses_in_one_line_and_writes_nothing(case, w, capsys):
    case_id, template, words = case
    before, root_before = _hash_tree(w["run"]), sorted(p.name for p in w["root"].iterdir())
    out = w["root"] / "fresh-push" / case_id
    _refused(_argv(template, w, out), capsys, words)
    assert _hash_tree(w["run"]) == before, "the existing run folder was changed"
    assert not out.exists() or not _hash_tree(out), f"files left in {out}"
    leftovers = [p for p in (w["root"] / "fresh-push").glob(".*")] \
        if (w["root"] / "fresh-push").exists() else []
    assert not leftovers, f"temp folders left: {leftovers}"
    assert not (w["root"] / "PWNED").exists()  # no pickled code ever ran
    assert sorted(p.name for p in w["root"].iterdir() if p.name != "fresh-push") == \
        [n for n in root_before if n != "fresh-push"]


# -- detect: hostile input (issue 21) -----------------------------------------------------------
def _coco_variant(w, name: str, change) -> Path:
    """A copy of the scenes' training COCO file with ``change(dict)`` applied (it may return a
    replacement for the whole document)."""
    source = w["root"] / "scenes" / "detection" / "annotations" / "instances_train.json"
    data = json.loads(source.read_text())
    data = change(data) or data
    path = w["root"] / "det_variants" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _set(where, **values):
    def change(data):
        target = data[where][0] if where else data
        target.update(values)
    return change


def _drop(where, key):
    def change(data):
        (data[where][0] if where else data).pop(key)
    return change


COCO_VARIANTS = {
    "no-categories": lambda d: d.update(categories=[]),
    "list-top-level": lambda d: d["images"],
    "segmentation-empty": _set("annotations", segmentation=[]),
    "image-no-width": _drop("images", "width"),
    "no-images-key": _drop(None, "images"),
    "no-annotations-key": _drop(None, "annotations"),
    "file-name-dotdot": _set("images", file_name="../x.png"),
    "file-name-absolute": _set("images", file_name="/etc/passwd"),
    "duplicate-image-id": lambda d: d["images"][1].update(id=d["images"][0]["id"]),
    "unknown-image-id": _set("annotations", image_id=999),
    "box-negative": _set("annotations", bbox=[10, 10, -5, 8]),
    "box-nan": _set("annotations", bbox=[10, 10, float("nan"), 8]),
    "box-outside": _set("annotations", bbox=[50, 50, 40, 40]),
    "two-categories": lambda d: d.update(
        categories=d["categories"][:2],
        annotations=[a for a in d["annotations"]
                     if a["category_id"] in {c["id"] for c in d["categories"][:2]}]),
}


@pytest.fixture(scope="module")
def det_data(w, transfer_runs) -> dict[str, Path]:
    """Broken COCO files beside the scenes' images, loose images for ``predict``, and an
    earlier export that must survive."""
    from conftest import write_png_header

    found = {f"{{COCO_{k}}}": _coco_variant(w, k, change) for k, change in COCO_VARIANTS.items()}
    loose = w["root"] / "det_loose"
    (loose / "empty").mkdir(parents=True)
    write_png_header(loose / "huge.png", 20000, 20000)
    for sub in ("a", "b"):
        _png(loose / sub / "x.png", size=(64, 64))
    (loose / "results.json").write_text("[]")
    _png(loose / "strip.png", size=(5000, 1))
    found["{COCO_huge}"] = _coco_variant(w, "huge", lambda d: d.update(
        images=[dict(id=1, file_name="huge.png", width=20000, height=20000)],
        annotations=[dict(id=1, image_id=1, category_id=d["categories"][0]["id"], iscrowd=0,
                          bbox=[10, 10, 50, 50], area=2500,
                          segmentation=[[10, 10, 60, 10, 60, 60, 10, 60]])]))
    export = w["root"] / "det_export"
    export.mkdir()
    (export / "model.pt").write_bytes(b"an earlier export")
    return {**found, "{LOOSE_DET}": loose, "{EXPORT}": export}


DET_TRAIN_DATA = [a for a in DET if a not in ("--data", "{SCENES}/detection")]
SCENE_IMAGES = "{SCENES}/detection/train"
VAL = ["--val-images", SCENE_IMAGES, "--val-ann", "{SCENES}/detection/annotations/instances_val.json"]


def _det_bad_coco(name: str, *words):
    return (f"detect-coco-{name}", [*DET_TRAIN_DATA, "--data", "", "--train-images",
                                    SCENE_IMAGES, "--train-ann", f"{{COCO_{name}}}", *VAL,
                                    "--output", "{OUT}"], 2, [f"{name}.json", *words])


DET_PREDICT = ["detect", "predict", "--checkpoint", "{DET}/model.pt", "--device", "cpu"]
DET_HOSTILE = [
    _det_bad_coco("no-categories", "'categories' is empty"),
    _det_bad_coco("list-top-level", "top level is a list"),
    _det_bad_coco("segmentation-empty", "'segmentation' is empty", "--no-masks"),
    _det_bad_coco("image-no-width", "'width'"),
    _det_bad_coco("no-images-key", "no 'images' key"),
    _det_bad_coco("no-annotations-key", "no 'annotations' key"),
    _det_bad_coco("file-name-dotdot", "'../x.png'", "outside the image folder"),
    _det_bad_coco("file-name-absolute", "'/etc/passwd'", "outside the image folder"),
    _det_bad_coco("duplicate-image-id", "appears twice"),
    _det_bad_coco("unknown-image-id", "image id 999", "not among"),
    _det_bad_coco("box-negative", "negative width or height"),
    _det_bad_coco("box-nan", "four finite numbers"),
    _det_bad_coco("box-outside", "outside its 64x64 image"),
    ("detect-train-20000px-png", [*DET_TRAIN_DATA, "--data", "", "--train-images",
                                  "{LOOSE_DET}", "--train-ann", "{COCO_huge}", *VAL,
                                  "--output", "{OUT}"], 2,
     ["huge.png", "20000x20000", "--max-image-pixels"]),
    ("detect-img-size-7", [*DET, "--output", "{OUT}", "--img-size", "7"], 2,
     ["--img-size 7", "at least 32"]),
    ("detect-anchor-sizes-negative", [*DET[:-6], "--anchor-sizes", "-8", "16", "32", "64",
                                      "128", "--output", "{OUT}"], 2, ["--anchor-sizes", ">= 1"]),
    ("detect-layer-decay-2", [*DET, "--output", "{OUT}", "--layer-decay", "2"], 2,
     ["--layer-decay", "(0, 1]"]),
    ("detect-scale-range-inverted", [*DET, "--output", "{OUT}", "--scale-range", "2", "0.5"], 2,
     ["--scale-range 2 0.5", "MIN <= MAX"]),
    ("detect-max-steps-0", [*DET, "--output", "{OUT}", "--max-steps", "0"], 2,
     ["--max-steps", ">= 1"]),
    ("detect-drop-path-1.5", [*DET, "--output", "{OUT}", "--drop-path", "1.5"], 2,
     ["--drop-path", "[0, 1)"]),
    ("pretrain-drop-path-1.5", [*PRE, "--data", "{R}/data/train", "--output", "{OUT}",
                                "--drop-path", "1.5"], 2, ["--drop-path", "[0, 1)"]),
    ("finetune-drop-path-1.5", [*FT, "--data", "{R}/data", "--output", "{OUT}",
                                "--drop-path", "1.5"], 2, ["--drop-path", "[0, 1)"]),
    ("detect-eval-json-exists", ["detect", "eval", "--checkpoint", "{DET}/model.pt", *VAL,
                                 "--json", "{LOOSE_DET}/results.json"], 2,
     ["--json", "already exists"]),
    ("detect-eval-json-unwritable", ["detect", "eval", "--checkpoint", "{DET}/model.pt", *VAL,
                                     "--json", "{R}/a-file/m.json"], 2, ["--json", "a-file"]),
    ("detect-eval-2-class-data-for-a-10-class-model",
     ["detect", "eval", "--checkpoint", "{DET}/model.pt", "--val-images", SCENE_IMAGES,
      "--val-ann", "{COCO_two-categories}", "--device", "cpu", "--workers", "0",
      "--no-progress"], 2, ["two-categories.json", "2 categories", "trained on 10"]),
    ("detect-eval-missing-checkpoint", ["detect", "eval", "--checkpoint", "{R}/nowhere.pt",
                                        *VAL], 2, ["nowhere.pt", "no such file"]),
    ("detect-predict-missing-image", [*DET_PREDICT, "{LOOSE_DET}/nope.png", "--output",
                                      "{OUT}"], 2, ["nope.png"]),
    ("detect-predict-20000px-png", [*DET_PREDICT, "{LOOSE_DET}/huge.png", "--output", "{OUT}"],
     2, ["huge.png", "20000x20000", "--max-image-pixels"]),
    ("detect-predict-empty-folder", [*DET_PREDICT, "{LOOSE_DET}/empty", "--output", "{OUT}"], 2,
     ["empty", "holds no image files"]),
    ("detect-predict-same-stem", [*DET_PREDICT, "{LOOSE_DET}/a/x.png", "{LOOSE_DET}/b/x.png",
                                  "--output", "{OUT}"], 2, ["x.png", "both be written"]),
    ("detect-predict-json-exists", [*DET_PREDICT, "{LOOSE_DET}/a/x.png", "--output", "{OUT}",
                                    "--json", "{LOOSE_DET}/results.json"], 2,
     ["--json", "already exists"]),
    ("detect-predict-ann-without-json", [*DET_PREDICT, "{LOOSE_DET}/a/x.png", "--output",
                                         "{OUT}", "--ann", "{COCO_huge}"], 2, ["--ann", "--json"]),
    ("detect-predict-1x5000-strip", [*DET_PREDICT, "{LOOSE_DET}/strip.png", "--output",
                                     "{OUT}"], 2, ["strip.png", "5000x1", "less than a pixel"]),
    ("export-existing-file", ["export", "--checkpoint", "{R}/clf.safetensors", "--format",
                              "torchscript", "--img-size", "32", "{EXPORT}/model.pt"], 2,
     ["model.pt", "already exists", "--overwrite"]),
]


@pytest.mark.parametrize("case", DET_HOSTILE, ids=[c[0] for c in DET_HOSTILE])
def test_detect_refuses_hostile_input_in_one_line(case, w, transfer_runs, det_data, capsys):
    case_id, template, code, words = case
    runs = {**transfer_runs, **{k: v for k, v in det_data.items() if v.is_dir()}}
    before = {key: _hash_tree(run) for key, run in runs.items()}
    out = w["root"] / "fresh" / case_id
    argv = _transfer_argv(template, w, runs, out)
    for key, path in det_data.items():
        argv = [a.replace(key, str(path)) for a in argv]
    _refused(argv, capsys, words, code=code)
    assert {key: _hash_tree(run) for key, run in runs.items()} == before
    assert not out.exists() or not _hash_tree(out), f"files left in {out}"


@pytest.mark.parametrize("command", ["detect", "segment"])
def test_predict_takes_an_image_smaller_than_the_stride(command, w, transfer_runs, tmp_path,
                                                        capsys):
    """A 3x3 image (below the network's 32 px stride) is predicted, not a traceback: the
    detector's transform and the segmenter's test resize both bring it up to size."""
    Image.fromarray(np.full((3, 3, 3), 120, np.uint8)).save(tmp_path / "tiny.png")
    run = transfer_runs["{DET}" if command == "detect" else "{SEG}"]
    assert main([command, "predict", "--checkpoint", str(run / "model.pt"), "--device", "cpu",
                 str(tmp_path / "tiny.png"), "--output", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err == ""
    assert Image.open(tmp_path / "out" / "tiny.png").size == (3, 3)


@pytest.mark.parametrize("command", ["detect", "segment"])
def test_predict_max_image_pixels_refuses_above_and_lets_through_at_the_limit(
        command, w, transfer_runs, tmp_path, capsys):
    """The override the size refusal names really works in both transfer commands: a 50x40
    image is refused at 1999 pixels (naming the option) and predicted at 2000."""
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(tmp_path / "a.png")
    run = transfer_runs["{DET}" if command == "detect" else "{SEG}"]
    argv = [command, "predict", "--checkpoint", str(run / "model.pt"), "--device", "cpu",
            str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]
    _refused([*argv, "--max-image-pixels", "1999"], capsys, ["a.png", "50x40",
                                                             "--max-image-pixels"])
    assert not (tmp_path / "out" / "a.png").exists()
    assert main([*argv, "--max-image-pixels", "2000"]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (50, 40)
