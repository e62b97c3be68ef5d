"""Mask R-CNN on ConvNeXt V2: shapes and losses, the COCO reader's checks, COCO mAP against
pycocotools called directly, and a tiny overfit run."""
import copy
import json

import numpy as np
import pytest
import torch

from convnextv2.detection import build_detector
from convnextv2.detection.data import CocoDetection, DataError, eval_transforms
from convnextv2.detection.evaluate import coco_map, to_coco_results
from convnextv2.transfer import build_backbone

from conftest import TOY_WIDE as TINY
SMALL_HEADS = dict(fpn_channels=32, box_head_dim=64, mask_head_dim=16,
                   anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_train=200,
                   rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                   rpn_post_nms_top_n_test=100, box_batch_size_per_image=64,
                   box_detections_per_img=20)


def _targets(n, size=64):
    out = []
    for i in range(n):
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 8:30, 10:40] = 1
        masks[1, 35:60, 30:50] = 1
        out.append(dict(boxes=torch.tensor([[10., 8, 40, 30], [30, 35, 50, 60]]),
                        labels=torch.tensor([1, 3]), masks=masks))
    return out


@pytest.mark.parametrize("masks", [True, False])
def test_detector_losses_backward_and_outputs(masks):
    torch.manual_seed(0)
    model = build_detector(3, build_backbone(None, drop_path_rate=0.2, **TINY), masks=masks,
                           min_size=64, max_size=64, **SMALL_HEADS)
    assert type(model).__name__ == ("MaskRCNN" if masks else "FasterRCNN")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    targets = _targets(2)
    targets[1]["masks"] = torch.nn.functional.pad(targets[1]["masks"], (0, 16))
    if not masks:
        for t in targets:
            t.pop("masks")
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if masks else set())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    stem = model.backbone.body.body.stem.conv.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    fpn = model.backbone(torch.rand(1, 3, 64, 64))
    assert list(fpn) == ["0", "1", "2", "3", "pool"]
    assert [v.shape[-1] for v in fpn.values()] == [16, 8, 4, 2, 1]
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[1]["boxes"].shape[1] == 4
    if masks:
        assert out[1]["masks"].shape[1:] == (1, 64, 80)


# -- COCO reading ---------------------------------------------------------------------------
def _coco_files(tmp_path, annotations=None, images=None, categories=None, size=(48, 64)):
    """Two gray images and a COCO file with category ids 3 and 7 (not 1..K on purpose)."""
    from PIL import Image

    h, w = size
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    images = images or [dict(id=1, file_name="a.png", width=w, height=h),
                        dict(id=2, file_name="b.png", width=w, height=h)]
    for im in images:
        if not (folder / im["file_name"]).exists():
            Image.new("RGB", (w, h), (90, 90, 90)).save(folder / im["file_name"])
    poly = [[10, 10, 30, 10, 30, 30, 10, 30]]
    annotations = annotations if annotations is not None else [
        dict(id=1, image_id=1, category_id=3, bbox=[10, 10, 20, 20], area=400, iscrowd=0,
             segmentation=poly),
        dict(id=2, image_id=1, category_id=7, bbox=[35, 5, 20, 30], area=600, iscrowd=0,
             segmentation=[[35, 5, 55, 5, 55, 35, 35, 35]]),
        dict(id=3, image_id=2, category_id=7, bbox=[5, 20, 25, 20], area=500, iscrowd=0,
             segmentation=[[5, 20, 30, 20, 30, 40, 5, 40]]),
    ]
    categories = categories or [dict(id=3, name="cat"), dict(id=7, name="dog")]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(dict(images=images, annotations=annotations,
                                   categories=categories)))
    return folder, ann


def test_coco_reader_targets(tmp_path):
    folder, ann = _coco_files(tmp_path)
    ds = CocoDetection(folder, ann, eval_transforms())
    assert ds.classes == ["cat", "dog"] and ds.cat_ids == [3, 7]
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert target["labels"].tolist() == [1, 2]
    assert target["boxes"].tolist() == [[10, 10, 30, 30], [35, 5, 55, 35]]
    assert target["masks"].shape == (2, 48, 64)
    assert target["masks"][0, 15:25, 15:25].all() and not target["masks"][0, 40:, :].any()


def _bad(tmp_path, **change):
    folder, ann = _coco_files(tmp_path)
    data = json.loads(ann.read_text())
    first = data["annotations"][0]
    for k, v in change.items():
        first[k] = v
    ann.write_text(json.dumps(data))
    return folder, ann


@pytest.mark.parametrize("change,message", [
    (dict(segmentation=[[10, 10, 30, 10, 30]]), "bad polygon"),
    (dict(segmentation=[[10, 10, 30, 10]]), "bad polygon"),
    (dict(segmentation=dict(size=[20, 20], counts="abc")), "does not match its image"),
    (dict(category_id=12), "category_id 12 is outside"),
])
def test_coco_reader_rejects_bad_annotations(tmp_path, change, message):
    folder, ann = _bad(tmp_path, **change)
    with pytest.raises(DataError, match=message) as err:
        CocoDetection(folder, ann)
    assert "annotation id 1" in str(err.value) and "\n" not in str(err.value)


def test_coco_reader_missing_image_and_wrong_size(tmp_path):
    from PIL import Image

    folder, ann = _coco_files(tmp_path)
    (folder / "b.png").unlink()
    with pytest.raises(DataError, match="'b.png', which is missing"):
        CocoDetection(folder, ann)
    Image.new("RGB", (30, 30)).save(folder / "b.png")
    ds = CocoDetection(folder, ann)
    with pytest.raises(DataError, match="30x30 but instances.json says 64x48"):
        ds[1]


def test_cli_reports_bad_data_as_one_line(tmp_path, capsys):
    from convnextv2.cli import main

    folder, ann = _bad(tmp_path, category_id=99)
    code = main(["detect", "eval", "--checkpoint", str(tmp_path / "none.pt"),
                 "--val-images", str(folder), "--val-ann", str(ann)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err


# -- mAP ------------------------------------------------------------------------------------
def test_map_equals_pycocotools(tmp_path):
    """Hand-made ground truth and predictions: the package's conversion and scoring give what
    pycocotools gives on records built here by hand."""
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    folder, ann = _coco_files(tmp_path)
    ds = CocoDetection(folder, ann)

    def box_mask(x0, y0, x1, y1):
        m = torch.zeros(1, 48, 64)
        m[0, int(y0):int(y1), int(x0):int(x1)] = 0.9
        return m

    boxes1 = [[11, 9, 31, 29], [34, 6, 54, 33], [0, 0, 10, 10]]
    boxes2 = [[6, 21, 28, 41], [5, 20, 30, 40]]
    outputs = [
        dict(boxes=torch.tensor(boxes1, dtype=torch.float32),
             scores=torch.tensor([0.9, 0.8, 0.7]), labels=torch.tensor([1, 2, 2]),
             masks=torch.stack([box_mask(*b) for b in boxes1])),
        dict(boxes=torch.tensor(boxes2, dtype=torch.float32),
             scores=torch.tensor([0.6, 0.95]), labels=torch.tensor([2, 1]),
             masks=torch.stack([box_mask(*b) for b in boxes2])),
    ]
    records = to_coco_results(outputs, [1, 2], ds.cat_ids)
    cats = {1: 3, 2: 7}
    direct = []
    for image_id, out in zip([1, 2], outputs):
        for b, s, lab, m in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                out["labels"].tolist(), out["masks"]):
            rle = mask_utils.encode(np.asfortranarray((m[0] > 0.5).numpy().astype(np.uint8)))
            direct.append(dict(image_id=image_id, category_id=cats[lab], score=s,
                               bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], segmentation=rle))
    for kind in ("bbox", "segm"):
        ours = coco_map(copy.deepcopy(ds.coco), records, kind)
        ev = COCOeval(ds.coco, ds.coco.loadRes(copy.deepcopy(direct)), kind)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert ours["AP"] == pytest.approx(ev.stats[0], abs=1e-9)
        assert ours["AP50"] == pytest.approx(ev.stats[1], abs=1e-9)
        assert 0.2 < ours["AP"] < 1.0  # a real mix of hits and misses
    # perfect predictions score 1, none score 0
    perfect = [dict(boxes=torch.tensor([[10., 10, 30, 30], [35, 5, 55, 35]]),
                    scores=torch.tensor([1., 1.]), labels=torch.tensor([1, 2])),
               dict(boxes=torch.tensor([[5., 20, 30, 40]]), scores=torch.tensor([1.]),
                    labels=torch.tensor([2]))]
    assert coco_map(ds.coco, to_coco_results(perfect, [1, 2], ds.cat_ids))["AP"] == 1.0
    assert coco_map(ds.coco, [])["AP"] == 0.0


def test_tiny_overfit_reaches_high_map(tmp_path):
    """A few synthetic scenes learnt by heart: box mAP@0.5 on those scenes goes high."""
    from convnextv2.detection.train import DetectionData, DetectionTask
    from convnextv2.transfer.engine import TransferConfig, train
    from convnextv2.transfer.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "scenes", n_train=4, n_val=1, size=96, seed=1)
    r = root["detection"]
    data = DetectionData(r / "train", r / "annotations/instances_train.json", r / "train",
                         r / "annotations/instances_train.json")
    task = DetectionTask(data, img_size=96, scale_range=None, detector_kwargs=dict(
        SMALL_HEADS, fpn_channels=32, box_head_dim=64, mask_head_dim=16))
    cfg = TransferConfig(output=str(tmp_path / "run"), iters=120, batch_size=2, lr=2e-3,
                         schedule="cosine", warmup_steps=10, workers=0, eval_batch_size=4,
                         eval_every=120, progress=False, **TINY)
    summary = train(task, cfg)
    assert summary["metrics"]["bbox_AP50"] > 80, summary["metrics"]
    assert summary["metrics"]["segm_AP50"] > 60, summary["metrics"]
    assert (tmp_path / "run" / "model.pt").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_bad_image_met_in_a_loader_worker_is_one_line(tmp_path, capsys):
    """A file that fails only when a worker process loads it (its size differs from the
    annotation file's) comes back through the DataLoader wrapped in the worker's traceback;
    the command still ends with the one line naming the file, exit 2."""
    from PIL import Image

    from convnextv2.cli import main

    folder, ann = _coco_files(tmp_path)
    Image.new("RGB", (30, 30)).save(folder / "b.png")
    code = main(["detect", "train", "--train-images", str(folder), "--train-ann", str(ann),
                 "--val-images", str(folder), "--val-ann", str(ann), "--data", "",
                 "--output", str(tmp_path / "run"), "--depths", "1", "1", "1", "1", "--dims",
                 "8", "16", "24", "32", "--img-size", "64", "--batch-size", "2",
                 "--workers", "1", "--no-progress", "--device", "cpu", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "b.png" in err and "30x30" in err and "Traceback" not in err, err
