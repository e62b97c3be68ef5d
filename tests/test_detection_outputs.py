"""What ``detect predict`` hands to others: COCO results (``--json``) that pycocotools loads
and scores exactly as ``detect eval`` does, folders read like ``predict`` reads them, and
every target checked before any work."""
import json

import pytest

from convnextv2.cli import main

from conftest import TOY_WIDE

HEADS = ["--fpn-channels", "32", "--box-head-dim", "64", "--mask-head-dim", "16",
         "--anchor-sizes", "8", "16", "32", "64", "128"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four scenes learnt by heart (as the overfit test does): a detector whose AP is high,
    so that agreeing scores mean something."""
    from convnextv2.detection.train import DetectionData, DetectionTask
    from convnextv2.transfer.engine import TransferConfig, train
    from convnextv2.transfer.synthetic import write_synthetic

    tmp = tmp_path_factory.mktemp("det_out")
    r = write_synthetic(tmp / "scenes", n_train=4, n_val=1, size=96, seed=1)["detection"]
    ann = r / "annotations/instances_train.json"
    data = DetectionData(r / "train", ann, r / "train", ann)
    task = DetectionTask(data, img_size=96, scale_range=None, detector_kwargs=dict(
        fpn_channels=32, box_head_dim=64, mask_head_dim=16, anchor_sizes=(8, 16, 32, 64, 128),
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, box_detections_per_img=20))
    cfg = TransferConfig(output=str(tmp / "run"), iters=120, batch_size=2, lr=2e-3,
                         schedule="cosine", warmup_steps=10, workers=0, eval_batch_size=4,
                         eval_every=120, progress=False, **TOY_WIDE)
    train(task, cfg)
    return dict(tmp=tmp, images=r / "train", ann=ann, model=tmp / "run" / "model.pt")


def test_predict_json_is_scored_by_pycocotools_as_eval_scores_it(trained, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    t = trained
    ev = t["tmp"] / "eval.json"
    assert main(["detect", "eval", "--checkpoint", str(t["model"]), "--val-images",
                 str(t["images"]), "--val-ann", str(t["ann"]), "--batch-size", "1",
                 "--workers", "0", "--no-progress", "--json", str(ev)]) == 0
    metrics = json.loads(ev.read_text())
    assert metrics["bbox_AP50"] > 50, metrics
    results = t["tmp"] / "results.json"
    # a folder, read like `predict` reads one
    assert main(["detect", "predict", "--checkpoint", str(t["model"]), str(t["images"]),
                 "--output", str(t["tmp"] / "pngs"), "--json", str(results),
                 "--ann", str(t["ann"])]) == 0
    records = json.loads(results.read_text())
    assert len(list((t["tmp"] / "pngs").glob("*.png"))) == 4
    assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(records[0])
    assert set(records[0]["segmentation"]) == {"size", "counts"}
    gt = json.loads(t["ann"].read_text())
    assert {r["image_id"] for r in records} <= {im["id"] for im in gt["images"]}
    assert {r["category_id"] for r in records} <= {c["id"] for c in gt["categories"]}
    capsys.readouterr()
    coco = COCO(str(t["ann"]))
    for kind in ("bbox", "segm"):
        ev = COCOeval(coco, coco.loadRes(str(results)), kind)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert 100 * ev.stats[0] == pytest.approx(metrics[f"{kind}_AP"], abs=1e-6)
        assert 100 * ev.stats[1] == pytest.approx(metrics[f"{kind}_AP50"], abs=1e-6)


def test_every_target_is_checked_before_any_work(trained, tmp_path, capsys):
    """Two images with one name stem, an existing --json, and image names the --ann file
    does not list are refused before a single PNG is written."""
    from PIL import Image

    t = trained
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.open(next(t["images"].glob("*.jpg"))).save(tmp_path / sub / "x.png")
    base = ["detect", "predict", "--checkpoint", str(t["model"])]
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "a/x.png"), str(tmp_path / "b/x.png"), "--output", str(out)],
         "both be written"),
        ([str(t["images"]), "--output", str(out), "--json", str(t["ann"])], "already exists"),
        ([str(tmp_path / "a/x.png"), "--output", str(out), "--json", str(tmp_path / "r.json")],
         "numeric file name"),
        ([str(tmp_path / "a/x.png"), "--output", str(out), "--json", str(tmp_path / "r.json"),
          "--ann", str(t["ann"])], "no image named 'x.png'"),
        ([str(tmp_path / "a"), "--output", str(out), "--json",
          str(tmp_path / "a/x.png/r.json")], "--json"),
    ]
    for argv, words in cases:
        assert main([*base, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not out.exists() or not any(out.iterdir())
        assert not (tmp_path / "r.json").exists()


def test_eval_json_target_is_checked_before_the_evaluation(trained, capsys, monkeypatch):
    import convnextv2.detection.evaluate as evaluate

    def never(*a, **k):
        raise AssertionError("evaluated although --json was refused")

    monkeypatch.setattr(evaluate, "evaluate_detector", never)
    t = trained
    assert main(["detect", "eval", "--checkpoint", str(t["model"]), "--val-images",
                 str(t["images"]), "--val-ann", str(t["ann"]), "--json", str(t["ann"])]) == 2
    assert "already exists" in capsys.readouterr().err
