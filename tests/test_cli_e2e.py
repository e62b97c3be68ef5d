"""End to end through the command line on the built-in data: pretrain -> finetune -> eval ->
predict -> export, and the demo's quick mode."""
import json

import numpy as np
import pytest
import torch

from convnextv2.cli import main

from conftest import TOY_DIMS, TOY_FLAGS

TOY = [*TOY_FLAGS, "--stem-stride", "1", "--in-chans", "1", "--img-size", "32"]
CLASSES = ["Ankle boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "Sneaker",
           "T-shirt_top", "Trouser"]  # folder names, sorted as ImageFolder sorts them



def _image_tree(root, per_class):
    """An ImageFolder tree (train/ and val/) of PNGs cut from the built-in data."""
    from convnextv2.data import build_dataset
    for split, n in per_class.items():
        ds = build_dataset("builtin", split)
        count = {}
        for img, target in (ds[i] for i in range(len(ds))):
            name = ds.classes[target].replace("/", "_")
            if count.get(name, 0) < n:
                (root / split / name).mkdir(parents=True, exist_ok=True)
                img.save(root / split / name / f"{count.get(name, 0)}.png")
                count[name] = count.get(name, 0) + 1
            if len(count) == 10 and min(count.values()) == n:
                break
    return root


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    pytest.importorskip("convnextv2.checkpoint", reason="checkpoint module not written yet")
    root = tmp_path_factory.mktemp("e2e")
    _image_tree(root / "data", {"train": 24, "val": 8})
    assert main(["pretrain", "--model", "atto", "--data", str(root / "data"), "--output",
                 str(root / "pre"), *TOY, "--decoder-dim", "16", "--batch-size", "16",
                 "--epochs", "1", "--max-steps", "3", "--workers", "0", "--recon-every", "0",
                 "--lr", "1e-3", "--no-progress"]) == 0
    assert (root / "pre" / "encoder.safetensors").is_file()
    # the architecture (custom depths/dims, stem stride 1, 1 channel) comes from the checkpoint
    assert main(["finetune", "--data", str(root / "data"), "--output", str(root / "ft"),
                 "--finetune", str(root / "pre" / "encoder.safetensors"), "--img-size", "32",
                 "--epochs", "2", "--batch-size", "32", "--lr", "3e-3",
                 "--aa", "none", "--model-ema-decay", "0.9", "--no-progress"]) == 0
    return root


def test_finetune_outputs(finetuned):
    ft = finetuned / "ft"
    for name in ("best.safetensors", "last.safetensors", "last_ema.safetensors",
                 "metrics.jsonl", "accuracy.png", "loss.png", "summary.json", "config.json"):
        assert (ft / name).is_file(), name
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["model_config"]["dims"] == list(TOY_DIMS)
    assert cfg["model_config"]["stem_stride"] == 1 and cfg["model_config"]["in_chans"] == 1
    assert cfg["classes"] == CLASSES
    records = [json.loads(l) for l in (ft / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"val_top1", "val_top5", "val_loss", "ema_val_top1"} <= set(records[0])


def test_eval_json_and_confusion(finetuned, capsys):
    ft = finetuned / "ft"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ft / "last.safetensors"), "--data",
                 str(finetuned / "data"), "--json", "--output", str(finetuned / "eval")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["count"] == 80 and res["img_size"] == 32
    assert list(res["per_class_top1"]) == CLASSES
    cm = np.array(res["confusion"])
    assert cm.sum() == 80 and (cm.sum(axis=1) == 8).all()
    assert res["top1"] == pytest.approx(100 * np.trace(cm) / 80)
    assert res["per_class_top1"]["Bag"] == pytest.approx(100 * cm[1, 1] / 8)
    assert res["top5"] >= res["top1"]
    assert (finetuned / "eval" / "confusion_matrix.png").stat().st_size > 1000


def test_predict_uses_stored_class_names(finetuned, capsys):
    paths = [finetuned / "data" / "val" / "Bag" / "0.png",
             finetuned / "data" / "val" / "Coat" / "1.png"]
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(finetuned / "ft" / "best.safetensors"),
                 *map(str, paths), "--topk", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 2 and len(res[0]["top"]) == 3
    assert all(t["label"] in CLASSES for r in res for t in r["top"])
    probs = [t["probability"] for t in res[0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_export_cli_onnx(finetuned, capsys):
    pytest.importorskip("onnxruntime")
    out = finetuned / "model.onnx"
    assert main(["export", "--checkpoint", str(finetuned / "ft" / "best.safetensors"),
                 "--format", "onnx", str(out)]) == 0
    assert "max |diff|" in capsys.readouterr().out and out.stat().st_size > 10000


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tmp_path / "none.safetensors"),
                 str(tmp_path / "x.png")]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tmp_path / "missing"), "--output",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_quick(tmp_path, capsys):
    pytest.importorskip("convnextv2.checkpoint", reason="checkpoint module not written yet")
    assert main(["demo", "--quick", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "| FCMAE + fine-tune |" in out and "| from scratch |" in out
    report = tmp_path / "demo" / "report"
    results = json.loads((report / "metrics.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["FCMAE + fine-tune", "from scratch"]
    assert results["winner"] in ("FCMAE + fine-tune", "from scratch")
    for name in ("finetune_curves.png", "reconstruction.png", "table.md"):
        assert (report / name).is_file(), name
