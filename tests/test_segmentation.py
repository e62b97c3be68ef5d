"""UPerNet on ConvNeXt V2: shapes and losses, the ADE20K-layout reader's label convention and
checks, mIoU and pixel accuracy against a hand calculation, and a tiny overfit run."""
import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2.segmentation import build_segmenter, segmentation_loss
from convnextv2.segmentation.data import SegmentationFolder, eval_transforms
from convnextv2.segmentation.evaluate import segmentation_metrics
from convnextv2.transfer import build_backbone
from convnextv2.transfer.errors import DataError

from conftest import TOY_WIDE as TINY


@pytest.mark.parametrize("aux,norm", [(True, "bn"), (False, "gn")])
def test_upernet_shapes_loss_backward(aux, norm):
    torch.manual_seed(0)
    model = build_segmenter(5, build_backbone(None, drop_path_rate=0.1, **TINY), channels=32,
                            aux=aux, aux_channels=16, norm=norm)
    x = torch.randn(2, 3, 96, 64)
    out = model(x)
    assert out["out"].shape == (2, 5, 96, 64)
    assert ("aux" in out) == aux and (not aux or out["aux"].shape == (2, 5, 96, 64))
    target = torch.randint(0, 5, (2, 96, 64))
    target[:, :10] = 255
    losses = segmentation_loss(out, target)
    assert set(losses) == {"loss_seg", "loss"} | ({"loss_aux"} if aux else set())
    # MMSegmentation's default: summed over labelled pixels, divided by all pixels
    ref = torch.nn.functional.cross_entropy(out["out"], target, ignore_index=255,
                                            reduction="sum") / target.numel()
    assert losses["loss_seg"].item() == pytest.approx(ref.item(), rel=1e-5)
    losses["loss"].backward()
    assert model.backbone.body.stem.conv.weight.grad.abs().sum() > 0
    model.eval()
    assert set(model(x)) == {"out"}


def _ade(tmp_path, masks, size=(6, 8), split="training"):
    root = tmp_path / "ade"
    for i, m in enumerate(masks):
        for kind in ("images", "annotations"):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (i * 30, 80, 80)).save(root / "images" / split / f"im{i}.jpg")
        Image.fromarray(np.asarray(m, np.uint8), mode="L").save(
            root / "annotations" / split / f"im{i}.png")
    return root


def test_reduce_zero_label_convention(tmp_path):
    raw = np.array([[0, 1, 2, 3, 3, 1]] * 8, np.uint8)  # 0 = ignore, 1..3 = classes
    root = _ade(tmp_path, [raw])
    (root / "classes.txt").write_text("sky\ntree\nroad\n")
    ds = SegmentationFolder(root, "train", eval_transforms())
    assert ds.classes == ["sky", "tree", "road"] and ds.num_classes == 3
    image, mask = ds[0]
    assert image.shape == (3, 8, 6) and mask.dtype == torch.int64
    assert mask[0].tolist() == [255, 0, 1, 2, 2, 0]
    plain = SegmentationFolder(root, "train", None, num_classes=4, reduce_zero_label=False)
    assert plain[0][1][0].tolist() == [0, 1, 2, 3, 3, 1]


def test_reader_errors(tmp_path):
    raw = np.full((8, 6), 2, np.uint8)
    root = _ade(tmp_path, [raw, raw])
    with pytest.raises(ValueError, match="--num-classes"):
        SegmentationFolder(root, "train")
    ds = SegmentationFolder(root, "train", num_classes=1)
    with pytest.raises(DataError, match=r"label value\(s\) \[2\] outside the class range"):
        ds[0]
    Image.new("L", (5, 5)).save(root / "annotations" / "training" / "im1.png")
    with pytest.raises(DataError, match="im1.png is 5x5 but its image im1.jpg is 6x8"):
        SegmentationFolder(root, "train", num_classes=3)
    (root / "annotations" / "training" / "im1.png").unlink()
    with pytest.raises(DataError, match="its mask .*im1.png is missing"):
        SegmentationFolder(root, "train", num_classes=3)
    with pytest.raises(FileNotFoundError, match="validation"):
        SegmentationFolder(root, "val", num_classes=3)


def test_miou_and_pixel_accuracy_by_hand():
    pred = torch.tensor([[0, 0, 1, 1, 2, 2],
                         [0, 1, 1, 1, 2, 0]])
    target = torch.tensor([[0, 0, 1, 1, 1, 2],
                           [0, 0, 1, 255, 2, 255]])
    # labelled pixels: 10. class 0: TP 3, FP 1 (row 1, col 5 is ignore -> not counted), FN 1
    #   -> pred 0 on labelled pixels: (0,0),(0,1),(1,0) = 3 TP; target 0 at (1,1) predicted 1
    #   -> IoU 3 / 4
    # class 1: target at (0,2),(0,3),(0,4),(1,2); pred 1 at (0,2),(0,3),(1,1),(1,2)
    #   -> TP 3, FP 1, FN 1 -> 3 / 5
    # class 2: target at (0,5),(1,4); pred 2 at (0,4),(0,5),(1,4) -> TP 2, FP 1 -> 2 / 3
    m = segmentation_metrics(3)
    m.update(pred[None], target[None])
    got = m.compute()
    assert got["mIoU"] == pytest.approx((3 / 4 + 3 / 5 + 2 / 3) / 3)
    assert got["aAcc"] == pytest.approx(8 / 10)
    assert got["mAcc"] == pytest.approx((3 / 4 + 3 / 4 + 2 / 2) / 3)
    # accumulated over images as one confusion matrix, not averaged per image
    m = segmentation_metrics(3)
    m.update(pred[None, :1], target[None, :1])
    m.update(pred[None, 1:], target[None, 1:])
    assert m.compute()["mIoU"] == pytest.approx(got["mIoU"])


def test_tiny_overfit_reaches_high_miou(tmp_path):
    """A few synthetic scenes learnt by heart: mIoU on those scenes goes high."""
    import shutil

    from convnextv2.segmentation.train import SegmentationTask
    from convnextv2.transfer.engine import TransferConfig, train
    from convnextv2.transfer.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "scenes", n_train=4, n_val=1, size=64, seed=2)["segmentation"]
    for kind in ("images", "annotations"):  # score on the training scenes themselves
        shutil.rmtree(root / kind / "validation")
        shutil.copytree(root / kind / "training", root / kind / "validation")
    task = SegmentationTask(root, crop=64, scale=(64, 64), ratio_range=(1.0, 1.0),
                            photometric=False, head_kwargs=dict(channels=32, aux_channels=16))
    # the classifiers start at N(0, 0.01) (MMSegmentation's init): almost no gradient reaches
    # the rest until they grow, so a short run needs a high lr (3e-3 x 140 steps: mIoU 24)
    cfg = TransferConfig(output=str(tmp_path / "run"), iters=200, batch_size=4, lr=2e-2,
                         schedule="poly", warmup_steps=5, workers=0, eval_batch_size=4,
                         eval_every=200, layer_decay_mode="stage_wise", progress=False,
                         **TINY)
    summary = train(task, cfg)
    assert summary["metrics"]["mIoU"] > 70, summary["metrics"]
    assert summary["metrics"]["aAcc"] > 90, summary["metrics"]


def test_resume_continues_exactly(tmp_path):
    """Stopping after 3 steps and resuming with --resume auto ends on the same weights as an
    uninterrupted run (data order, augmentation, dropout and optimizer state all restored)."""
    from convnextv2.segmentation.train import SegmentationTask
    from convnextv2.transfer.engine import TransferConfig, train
    from convnextv2.transfer.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "scenes", n_train=6, n_val=2, size=64, seed=4)["segmentation"]
    task = SegmentationTask(root, crop=48, scale=(64, 64), ratio_range=(0.75, 1.25),
                            head_kwargs=dict(channels=16, aux_channels=8))

    def run(output, **kw):
        cfg = TransferConfig(output=str(output), iters=6, batch_size=2, lr=1e-3, workers=0,
                             eval_batch_size=2, eval_every=6, progress=False, seed=3,
                             drop_path=0.1, **TINY, **kw)
        return train(task, cfg)

    run(tmp_path / "straight")
    run(tmp_path / "resumed", max_steps=4)  # crosses an epoch boundary (3 steps per epoch)
    run(tmp_path / "resumed", resume="auto")
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
