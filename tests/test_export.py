"""Export (ONNX through onnxruntime, TorchScript) and prediction with stored class names."""
import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2 import create_model
from convnextv2.recipes.evaluate import class_names, imagenet_class_names, predict
from convnextv2.tools.export import export_model, verify_export

TOY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), stem_stride=1)



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
