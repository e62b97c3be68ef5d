"""Segmentation as MMSegmentation's configs for the paper run it (issue 21): the model
normalises its input, the keep-ratio rescale, each eval image scored at its own size, sliding
windows, the loss, the init, the crop, the photometric distortion, mIoU without absent
classes, and the ADE20K label PNGs of ``predict``.

The tests of the three bugs (normalisation, orientation, stretched eval batches) use only what
the code before the fixes also had, and fail on it.
"""
import colorsys
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TOY_WIDE
from convnextv2.segmentation import build_segmenter, segmentation_loss
from convnextv2.segmentation.data import SegmentationFolder, eval_transforms, train_transforms
from convnextv2.transfer import build_backbone

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _ade(root, images: dict, split="training", num_classes=None):
    """An ADE20K-layout folder: ``images`` maps stem -> (RGB uint8 HxWx3, mask HxW of raw
    values, 0 = ignore)."""
    for kind in ("images", "annotations"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    for stem, (rgb, mask) in images.items():
        Image.fromarray(rgb).save(root / "images" / split / f"{stem}.png")
        Image.fromarray(np.asarray(mask, np.uint8), mode="L").save(
            root / "annotations" / split / f"{stem}.png")
    if num_classes:
        (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(num_classes)))
    return root


# -- bug 1: the segmenter normalises its input ----------------------------------------------------
def test_backbone_sees_the_normalised_image_as_the_classifier_did(tmp_path):
    from convnextv2.checkpoint import save_checkpoint
    from convnextv2.models.registry import create_model

    torch.manual_seed(0)
    classifier = create_model("atto", num_classes=5, **TOY_WIDE).eval()
    save_checkpoint(classifier, tmp_path / "clf.safetensors")
    segmenter = build_segmenter(3, build_backbone(None, str(tmp_path / "clf.safetensors")),
                                channels=16, aux_channels=8).eval()
    seen = []
    segmenter.backbone.body.register_forward_hook(lambda m, i, out: seen.append(out))
    x = torch.rand(2, 3, 64, 96)  # a 0-1 image, as the data pipeline gives
    with torch.no_grad():
        segmenter(x)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        expected = classifier.forward_intermediates((x - mean) / std)
    assert len(seen[0]) == 4
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_mean_and_std_travel_with_the_model_and_old_files_keep_theirs():
    from convnextv2.segmentation import segmenter_from_config

    model = build_segmenter(2, build_backbone(None, **TOY_WIDE), channels=8, aux_channels=8,
                            image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    assert model.config["image_mean"] == [0.5] * 3 and model.config["image_std"] == [0.25] * 3
    rebuilt = segmenter_from_config(model.config)
    assert rebuilt.image_mean.flatten().tolist() == [0.5] * 3
    assert set(model.state_dict()) == set(rebuilt.state_dict())  # not in the weights
    old = {k: v for k, v in model.config.items() if k not in ("image_mean", "image_std")}
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(segmenter_from_config(old).normalize(x), x)  # trained on 0-1 input


# -- bug 2: the keep-ratio rescale does not depend on orientation -------------------------------
def _valid_extent(mask: torch.Tensor) -> tuple[int, int]:
    """Rows and columns holding labelled pixels (wherever the flip put them)."""
    return int((mask != 255).any(1).sum()), int((mask != 255).any(0).sum())


def test_landscape_and_portrait_train_at_the_same_scale(tmp_path):
    """ADE20K's (2048, 512) keep-ratio rule: a 683x512 image keeps its size (factor 1), and so
    does its 512x683 portrait twin; the crop (1024) is larger, so nothing is cut off."""
    rgb = np.full((512, 683, 3), 100, np.uint8)
    ones = np.ones((512, 683), np.uint8)
    root = _ade(tmp_path / "ade", {"land": (rgb, ones),
                                   "port": (rgb.transpose(1, 0, 2).copy(), ones.T.copy())})
    ds = SegmentationFolder(root, "train", train_transforms(1024, (512, 2048), (1.0, 1.0),
                                                            photometric=False), num_classes=1)
    sizes = {}
    for i, (image, _) in enumerate(ds.samples):
        sizes[image.stem] = _valid_extent(ds[i][1])
    assert sizes["land"] == (512, 683)
    assert sizes["port"] == (683, 512)


def test_keep_ratio_rule_by_hand():
    from convnextv2.segmentation.transforms import keep_ratio_scale, scaled_size

    # short side to 512 unless the long side would pass 2048
    assert keep_ratio_scale(512, 683, 2048, 512) == 1.0
    assert keep_ratio_scale(683, 512, 2048, 512) == 1.0
    assert scaled_size(300, 400, keep_ratio_scale(300, 400, 2048, 512)) == (512, 683)
    assert scaled_size(100, 1000, keep_ratio_scale(100, 1000, 2048, 512)) == (205, 2048)
    # ratio 0.5: targets (1024, 256)
    assert scaled_size(512, 683, keep_ratio_scale(512, 683, 1024, 256)) == (256, 342)


# -- bug 3: each eval image is scored at its own size -------------------------------------------
class _ColourModel(torch.nn.Module):
    """A perfect 'segmenter' for images whose class is their strongest colour channel."""

    def forward(self, x):
        return {"out": 10 * x}


def test_eval_batches_of_different_sizes_are_not_stretched(tmp_path):
    from convnextv2.segmentation.evaluate import evaluate_segmenter
    from convnextv2.segmentation.train import SegmentationTask

    def halves(h, w):  # left half red (class 0), right half green (class 1)
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[:, : w // 2, 0] = 255
        rgb[:, w // 2:, 1] = 255
        mask = np.where(np.arange(w) < w // 2, 1, 2)[None].repeat(h, 0)  # raw 1, 2
        return rgb, mask

    root = _ade(tmp_path / "ade", {"a": halves(32, 32), "b": halves(64, 64)}, "validation", 3)
    ds = SegmentationFolder(root, "val", eval_transforms(32))  # both become 32x32
    task = SegmentationTask(root, crop=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=task.collate(False))
    metrics = evaluate_segmenter(_ColourModel(), loader, 3, "cpu", progress=False)
    assert metrics["aAcc"] == pytest.approx(100.0)
    assert metrics["mIoU"] == pytest.approx(100.0)  # classes 0 and 1; class 2 is absent


# -- sliding windows ----------------------------------------------------------------------------
def test_window_counts_of_the_ade20k_test():
    from convnextv2.segmentation.inference import window_starts

    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]  # the last window ends at the edge
    assert len(window_starts(2048, 512, 341)) == 6  # ceil((2048 - 512) / 341) + 1
    assert window_starts(300, 512, 341) == [0]  # smaller than a window: one, the image


class _Counting(torch.nn.Module):
    """A pointwise (1x1 conv) segmenter that counts its calls: translation-equivariant, so
    stitched windows must give exactly the whole-image logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return {"out": self.conv(x)}


def test_slide_stitching_equals_whole_image_inference():
    from convnextv2.segmentation.inference import image_logits

    model, x = _Counting(), torch.rand(1, 3, 48, 48)
    whole = image_logits(model, x, "whole")
    slide = image_logits(model, x, "slide", window=48, stride=32)  # the image is one window
    assert model.calls == [(48, 48), (48, 48)]
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)
    model.calls.clear()
    x = torch.rand(1, 3, 70, 100)
    slide = image_logits(model, x, "slide", window=32, stride=21)
    # rows ceil((70 - 32) / 21) + 1 = 3, columns ceil((100 - 32) / 21) + 1 = 5
    assert len(model.calls) == 3 * 5 and set(model.calls) == {(32, 32)}
    torch.testing.assert_close(slide, image_logits(model, x, "whole"), rtol=1e-6, atol=1e-6)


def test_segment_eval_defaults_to_slide_at_the_training_crop(tmp_path):
    """A model trained on ADE20K-layout data keeps slide at its crop (stride 2/3) as its test;
    the builtin demo data is tested whole."""
    from convnextv2.segmentation.inference import test_settings
    from convnextv2.segmentation.train import SegmentationTask

    task = SegmentationTask(tmp_path, crop=512, eval_size=512)
    model = task.build_model(build_backbone(None, **TOY_WIDE), ["a", "b"])
    assert test_settings(model.config) == dict(mode="slide", size=512, window=512, stride=341,
                                                reduce_zero_label=True)
    assert test_settings(model.config, mode="whole")["mode"] == "whole"
    assert test_settings(model.config, window=96)["stride"] == 64
    assert test_settings({})["mode"] == "whole"  # models saved before the setting


# -- the loss, the init, the crop, the photometric distortion, mIoU ----------------------------
def test_cross_entropy_is_averaged_over_all_pixels_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]).T.reshape(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    # pixel 0: -log(e^2 / (e^2 + 1)); pixel 1: -log(e / (e + 1)); pixel 2 ignored; / 3 pixels
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))) / 3
    loss = segmentation_loss({"out": logits}, target)["loss_seg"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_heads_start_from_kaiming_and_classifiers_from_normal_0_01():
    torch.manual_seed(0)
    model = build_segmenter(150, build_backbone(None, **TOY_WIDE), channels=64, aux_channels=32)
    for head in (model.decode_head, model.aux_head):
        w = head.classifier.weight
        assert w.std().item() == pytest.approx(0.01, rel=0.1)
        assert w.mean().abs().item() < 0.002 and head.classifier.bias.abs().max() == 0
    conv = model.decode_head.fuse[0].weight  # 3x3, 64 out: fan-out 576
    assert conv.std().item() == pytest.approx(np.sqrt(2 / (64 * 9)), rel=0.05)
    assert model.decode_head.fuse[1].weight.eq(1).all() and model.decode_head.fuse[1].bias.eq(0).all()


def test_random_crop_redraws_crops_dominated_by_one_class():
    from convnextv2.segmentation.transforms import RandomCropCatMax

    mask = torch.zeros(64, 32, dtype=torch.int64)
    mask[40:] = 1  # rows 0-39 class 0, rows 40-63 class 1
    image = torch.zeros(3, 64, 32, dtype=torch.uint8)

    def balanced(crop, n=60):
        ok = 0
        for seed in range(n):
            random.seed(seed)
            _, m = crop(image, mask)
            ok += int((m == 0).float().mean() < 0.75)  # top offset > 16
        return ok / n

    assert balanced(RandomCropCatMax(32, 0.75)) > 0.95  # fails 10 redraws with p ~ 0.0013
    assert balanced(RandomCropCatMax(32, 1.0)) < 0.7  # a single draw: p = 16 / 33


def test_saturation_step_matches_hsv_scaling_by_hand():
    from convnextv2.segmentation.transforms import adjust_saturation_hsv

    pixels = [(200, 100, 50), (10, 20, 30), (255, 0, 128), (90, 90, 90), (0, 0, 0)]
    x = torch.tensor(pixels, dtype=torch.float32).T.reshape(3, 1, len(pixels))
    for factor in (0.5, 1.4):
        got = adjust_saturation_hsv(x, factor).reshape(3, -1).T
        for (r, g, b), out in zip(pixels, got):
            h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
            want = colorsys.hsv_to_rgb(h, min(1.0, s * factor), v)
            assert out.tolist() == pytest.approx([255 * c for c in want], abs=1e-3)


def test_photometric_distortion_ranges_on_a_gray_image():
    """On gray, saturation and hue do nothing: what is left is (128 + b) * c with b in +-32
    and c in 0.5-1.5, each step taken half of the time."""
    from convnextv2.segmentation.transforms import PhotoMetricDistortion

    random.seed(0)
    gray = torch.full((3, 2, 2), 128, dtype=torch.uint8)
    values = [int(PhotoMetricDistortion()(gray, None)[0][0, 0, 0]) for _ in range(400)]
    assert min(values) >= round(0.5 * 96) - 1 and max(values) <= 240
    untouched = sum(v == 128 for v in values) / len(values)
    assert 0.15 < untouched < 0.35  # neither step: 1/4
    assert min(values) < 70 and max(values) > 190  # the full ranges are used


def test_miou_leaves_out_classes_absent_from_prediction_and_truth():
    from convnextv2.segmentation.evaluate import segmentation_metrics

    pred = torch.tensor([[0, 0, 1, 1]])
    target = torch.tensor([[0, 1, 1, 1]])
    m = segmentation_metrics(4)  # classes 2 and 3 appear nowhere
    m.update(pred, target)
    got = m.compute()
    # class 0: TP 1, FP 1 -> 1/2; class 1: TP 2, FN 1 -> 2/3
    assert got["mIoU"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert got["mAcc"] == pytest.approx((1 + 2 / 3) / 2)
    m.update(torch.tensor([[3]]), torch.tensor([[0]]))  # predicted, never true: IoU 0, counted
    assert m.compute()["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


# -- predict --label-png ---------------------------------------------------------------------------
def test_predict_writes_ade20k_label_pngs(tmp_path, capsys):
    from convnextv2.cli import main
    from convnextv2.transfer.engine import save_model_file

    torch.manual_seed(0)
    model = build_segmenter(3, build_backbone(None, **TOY_WIDE), channels=8, aux_channels=8,
                            test=dict(mode="whole", size=None, window=64, stride=42,
                                      reduce_zero_label=True)).eval()
    save_model_file(model, tmp_path / "model.pt", model.config, ["a", "b", "c"])
    rgb = np.random.default_rng(0).integers(0, 256, (40, 72, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    argv = ["segment", "predict", "--checkpoint", str(tmp_path / "model.pt"),
            str(tmp_path / "photo.png"), "--output", str(tmp_path / "viz"), "--device", "cpu"]
    assert main([*argv, "--label-png", str(tmp_path / "labels")]) == 0
    label = np.asarray(Image.open(tmp_path / "labels" / "photo.png"))
    with torch.no_grad():
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        expected = model(x)["out"].argmax(1)[0].numpy() + 1  # ADE numbering: class k is k + 1
    assert label.dtype == np.uint8 and label.shape == (40, 72)
    assert np.array_equal(label, expected)
    assert (tmp_path / "viz" / "photo.png").is_file()
    # a second run never overwrites: refused before anything is written
    capsys.readouterr()
    assert main([*argv[:-4], "--output", str(tmp_path / "viz2"), "--device", "cpu",
                 "--label-png", str(tmp_path / "labels")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "viz2" / "photo.png").exists()
