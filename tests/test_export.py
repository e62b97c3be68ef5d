"""Export (ONNX through onnxruntime, TorchScript) and prediction with stored class names."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2 import create_model
from convnextv2.recipes.evaluate import class_names, imagenet_class_names, predict
from convnextv2.tools.export import export_model, verify_export

from conftest import TOY as _TOY

TOY = dict(_TOY, stem_stride=1)  # 8 px patches for 32 px inputs



def _random_model(**kw):
    """Non-trivial weights: GRN and head away from their zero/tiny initial values."""
    torch.manual_seed(0)
    model = create_model("atto", num_classes=5, **{**TOY, **kw})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "grn" in name or "head.fc" in name:
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("in_chans", [3, 1])
def test_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path, in_chans):
    ort = pytest.importorskip("onnxruntime")
    model = _random_model(in_chans=in_chans)
    path = tmp_path / "m.onnx"
    report = export_model(model, path, "onnx", img_size=32)
    assert max(report["max_abs_diff"].values()) <= 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, in_chans, 32, 32)  # a batch size never seen during export
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (5, 5) and np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max()))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_pytorch(tmp_path):
    model = _random_model()
    export_model(model, tmp_path / "m.pt", "torchscript", img_size=32)
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_verification_catches_a_wrong_export():
    model = _random_model()
    wrong = lambda x: model(torch.from_numpy(x)).detach().numpy() + 1e-3  # noqa: E731
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        verify_export(model, wrong, 3, 32)
    with pytest.raises(ValueError, match="onnx, torchscript"):
        export_model(model, "x.bin", "tflite")


def test_predict_returns_stored_class_names(tmp_path):
    model = _random_model()
    names = ["cat", "dog", "owl", "eel", "yak"]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))
    img.save(tmp_path / "a.png")
    from convnextv2.data import eval_transform
    tf = eval_transform(32, 3)
    [top] = predict(model, [tmp_path / "a.png"], tf, names, topk=3)
    with torch.no_grad():
        probs = model(tf(img)[None]).softmax(1)[0]
    order = probs.argsort(descending=True)[:3].tolist()
    assert [n for n, _ in top] == [names[i] for i in order]
    assert [p for _, p in top] == pytest.approx(probs[order].tolist(), abs=1e-6)


def test_class_name_sources():
    assert class_names(3, ["a", "b", "c"]) == ["a", "b", "c"]
    assert class_names(3, None) == ["0", "1", "2"]
    imagenet = imagenet_class_names()
    assert len(imagenet) == 1000 and imagenet[0] == "tench" and imagenet[207] == "golden retriever"
    assert class_names(1000, None) == imagenet


# -- a failed export never replaces a good file (issue 10, item 4) ----------------------------
def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_export_leaves_the_existing_file_alone(tmp_path, monkeypatch):
    import convnextv2.tools.export as ex

    model = _random_model()
    good = tmp_path / "m.pt"
    export_model(model, good, "torchscript", img_size=32)
    before = good.read_bytes()
    assert oct(good.stat().st_mode & 0o777) == "0o644"

    def wrong(model, run, *args, **kwargs):  # the check fails as for a broken exporter
        raise RuntimeError("exported model differs from PyTorch by 1 (> 1e-4) at batch size 1")
    monkeypatch.setattr(ex, "verify_export", wrong)
    with pytest.raises(RuntimeError, match="differs"):
        export_model(model, good, "torchscript", img_size=32)
    assert good.read_bytes() == before and _leftovers(tmp_path) == []
    monkeypatch.undo()
    # and a new file appears only complete: nothing at the target while it is checked
    seen = {}

    def spy(model, run, *args, **kwargs):
        seen["exists"] = (tmp_path / "new.pt").exists()
        return verify_export(model, run, *args, **kwargs)
    monkeypatch.setattr(ex, "verify_export", spy)
    export_model(model, tmp_path / "new.pt", "torchscript", img_size=32)
    assert seen == {"exists": False} and (tmp_path / "new.pt").is_file()
    assert _leftovers(tmp_path) == []


def test_export_into_a_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a path below a regular file cannot be created, even by root
    with pytest.raises(PermissionError, match="cannot write .*a-file"):
        export_model(_random_model(), blocker / "m.pt", "torchscript", img_size=32)


def test_verification_limit_scales_with_the_logits():
    model = _random_model()
    with torch.no_grad():
        model.head.fc.weight.mul_(1e4)  # logits of order 1e4: float32 rounding ~1e-3
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert model(x).abs().max() > 100
    shifted = lambda a: model(torch.from_numpy(a)).detach().numpy() * (1 + 1e-6)  # noqa: E731
    assert max(verify_export(model, shifted, 3, 32).values()) > 1e-4  # over the bare 1e-4


# -- predict on folders (issue 10, item 5) ----------------------------------------------------
def test_predict_cli_reads_the_images_of_a_folder(tmp_path, capsys):
    import json

    from convnextv2.checkpoint import save_checkpoint
    from convnextv2.cli import main

    model = _random_model()
    save_checkpoint(model, tmp_path / "m.safetensors",
                    metadata={"class_names": json.dumps(["cat", "dog", "owl", "eel", "yak"])})
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for name in ("b.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, and not read")
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), "--img-size", "32",
                 "--json", "--topk", "2", str(tmp_path / "imgs")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [Path(r["image"]).name for r in out] == ["a.jpg", "b.png"]  # name order
    assert all(len(r["top"]) == 2 and r["top"][0]["label"] in ("cat", "dog", "owl", "eel", "yak")
               for r in out)


def test_export_cli_replaces_an_existing_file_only_with_overwrite(tmp_path, capsys):
    """As ``convert`` does: an existing OUT is refused (exit 2, file untouched) unless
    ``--overwrite``, which then replaces it with a working export."""
    from convnextv2.checkpoint import save_checkpoint
    from convnextv2.cli import main

    save_checkpoint(_random_model(), tmp_path / "clf.safetensors")
    out = tmp_path / "m.pt"
    out.write_bytes(b"an earlier export")
    argv = ["export", "--checkpoint", str(tmp_path / "clf.safetensors"), "--format",
            "torchscript", "--img-size", "32", str(out)]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"an earlier export"
    assert main([*argv, "--overwrite"]) == 0
    assert torch.jit.load(str(out))(torch.rand(1, 3, 32, 32)).shape == (1, 5)
