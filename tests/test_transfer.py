"""The parts detection and segmentation share: backbone loading from a ``convnextv2
pretrain`` encoder, the detection-style layer-wise lr decay, the schedules, synthetic scenes."""
import json
import math

import numpy as np
import pytest
import torch

from convnextv2.transfer import build_backbone
from convnextv2.training.layer_decay import (default_num_layers, layer_id,
                                             param_groups_layer_decay)
from convnextv2.training.schedule import WarmupDecaySchedule

from conftest import TOY_WIDE as TINY


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """An ``encoder.safetensors`` written by ``convnextv2 pretrain`` (one step on a folder of
    synthetic scenes), as a user would have it."""
    from convnextv2.recipes.pretrain import PretrainConfig, pretrain
    from convnextv2.transfer.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("pre")
    paths = write_synthetic(root / "scenes", n_train=8, n_val=2, size=64, seed=3)
    out = root / "run"
    pretrain(PretrainConfig(model="convnextv2_atto", data=str(paths["detection"] / "train"),
                            output=str(out), epochs=1, batch_size=4, img_size=64, in_chans=3,
                            depths=TINY["depths"], dims=TINY["dims"], decoder_dim=16,
                            workers=0, max_steps=1, progress=False, recon_every=0))
    return out / "encoder.safetensors"


def test_pretrain_encoder_loads_into_both_models(encoder_file):
    from safetensors.torch import load_file

    from convnextv2.detection import build_detector
    from convnextv2.segmentation import build_segmenter

    saved = load_file(str(encoder_file))
    det = build_detector(3, build_backbone(pretrained=str(encoder_file)), min_size=64,
                         max_size=64, fpn_channels=32, box_head_dim=32, mask_head_dim=16)
    seg = build_segmenter(4, build_backbone(pretrained=str(encoder_file)), channels=32,
                          aux_channels=16)
    # every encoder tensor arrives under the model's own name, unchanged
    for prefix, model in (("backbone.body.body.", det), ("backbone.body.", seg)):
        state = model.state_dict()
        for key, value in saved.items():
            assert torch.equal(state[prefix + key], value), key
    # and the shape came from the file: a variant name is not needed
    assert det.backbone.body.config["dims"] == list(TINY["dims"])


def test_backbone_accepts_a_classifier_checkpoint(tmp_path):
    import convnextv2
    from convnextv2.models import create_model

    clf = create_model("convnextv2_atto", num_classes=7, **TINY)
    convnextv2.save_checkpoint(clf, tmp_path / "clf.safetensors", layout="timm")
    bb = build_backbone(pretrained=str(tmp_path / "clf.safetensors"), drop_path_rate=0.3)
    assert torch.equal(bb.body.stem.conv.weight, clf.stem.conv.weight)
    assert bb.config["drop_path_rate"] == 0.3
    feats = bb(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(TINY["dims"])
    assert [64 // f.shape[-1] for f in feats] == [4, 8, 16, 32]


def _mm_scale(name: str, num_layers: int, rate: float, mode: str) -> float:
    """The rule as the ConvNeXt mmdet/mmseg configs state it, on official parameter names
    (``downsample_layers.i``, ``stages.i.j``), written out here as an independent reference."""
    n = num_layers + 2
    if name.startswith("downsample_layers"):
        stage = int(name.split(".")[1])
        lid = 0 if mode == "stage_wise" else {0: 0, 1: 2, 2: 3, 3: num_layers}[stage]
    elif name.startswith("stages"):
        stage, block = int(name.split(".")[1]), int(name.split(".")[2])
        if mode == "stage_wise":
            lid = stage + 1
        else:
            lid = {0: 1, 1: 2, 2: 3 + block // 3, 3: num_layers}[stage]
    else:
        lid = n - 1
    return rate ** (n - lid - 1)


@pytest.mark.parametrize("mode,rate", [("layer_wise", 0.95), ("stage_wise", 0.9)])
def test_layer_decay_follows_the_detection_rule(mode, rate):
    from convnextv2.segmentation import build_segmenter

    depths = (3, 3, 9, 3)  # tiny: 6 layers in the configs
    assert default_num_layers(depths) == 6 and default_num_layers((3, 3, 27, 3)) == 12
    seg = build_segmenter(5, build_backbone(None, depths=depths, dims=(8, 8, 8, 8)),
                          channels=8, aux_channels=8)
    groups = param_groups_layer_decay(seg, weight_decay=0.05, layer_decay=rate, mode=mode,
                                      depths=depths, prefix="backbone.")
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    body = {k[len("backbone.body."):]: k for k in scale if k.startswith("backbone.body.")}
    checked = 0
    for native, full in body.items():
        parts = native.split(".")
        if parts[0] == "stem":
            ref = "downsample_layers.0"
        elif parts[2] == "downsample":
            ref = f"downsample_layers.{parts[1]}"
        else:
            ref = f"stages.{parts[1]}.{parts[3]}"
        assert math.isclose(scale[full], _mm_scale(ref, 6, rate, mode)), full
        checked += 1
    assert checked == len(body) > 20
    # outside the backbone: full rate; 1-D tensors and biases: no weight decay
    assert scale["decode_head.classifier.weight"] == 1.0
    assert scale["backbone.out_norms.0.weight"] == 1.0
    assert decay["decode_head.classifier.bias"] == 0.0
    assert decay["backbone.body.stages.2.blocks.8.pwconv1.weight"] == 0.05
    assert decay["backbone.body.stages.2.blocks.8.grn.gamma"] == 0.0
    assert layer_id("stages.2.blocks.8.dwconv.weight", depths, "layer_wise") == 5


def test_schedules():
    opt = torch.optim.AdamW([dict(params=[torch.nn.Parameter(torch.zeros(1))], lr_scale=0.5)])
    poly = WarmupDecaySchedule(opt, base_lr=1e-4, total_steps=1000, kind="poly",
                               warmup_steps=100, warmup_ratio=1e-6)
    assert poly.lr_at(0) == pytest.approx(1e-4 * 1e-6)
    assert poly.lr_at(50) == pytest.approx((1 - 0.5 * (1 - 1e-6)) * 1e-4 * 0.95)
    assert poly.lr_at(500) == pytest.approx(0.5e-4)
    assert poly.lr_at(1000) == 0.0
    step = WarmupDecaySchedule(opt, base_lr=1e-4, total_steps=36, kind="step")
    assert [step.lr_at(e) for e in (26, 27, 33)] == pytest.approx([1e-4, 1e-5, 1e-6])
    assert step.step(0) == pytest.approx(1e-4)  # the engine's interface: sets and returns
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-4)


def test_synthetic_scenes_are_deterministic_and_consistent(tmp_path):
    from PIL import Image

    from convnextv2.transfer.synthetic import write_synthetic

    a = write_synthetic(tmp_path / "a", n_train=3, n_val=1, size=96, seed=5)
    b = write_synthetic(tmp_path / "b", n_train=3, n_val=1, size=96, seed=5)
    ja = json.loads((a["detection"] / "annotations" / "instances_train.json").read_text())
    jb = json.loads((b["detection"] / "annotations" / "instances_train.json").read_text())
    assert ja["annotations"] == jb["annotations"]
    per_image = [sum(1 for x in ja["annotations"] if x["image_id"] == im["id"])
                 for im in ja["images"]]
    assert all(1 <= n <= 6 for n in per_image) and sum(per_image) >= 6
    # the semantic map agrees with the instances: each instance's pixels carry its class + 1
    from pycocotools import mask as mask_utils
    sem = np.asarray(Image.open(a["segmentation"] / "annotations" / "training" /
                                "scene_00000.png"))
    for ann in (x for x in ja["annotations"] if x["image_id"] == 1):
        m = mask_utils.decode(ann["segmentation"]).astype(bool)
        assert (sem[m] == ann["category_id"] + 1).all()
    assert set(np.unique(sem)) <= set(range(12)) and (sem == 1).mean() > 0.3


def test_cli_train_resume_eval_predict(tmp_path, monkeypatch, capsys):
    """The command line end to end on the built-in scenes: a run, a refused second run in the
    same folder, ``--resume auto``, eval and predict (PNGs)."""
    from convnextv2.cli import main
    from convnextv2.training import read_metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tiny = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--workers", "0",
            "--no-progress", "--eval-batch-size", "16"]
    run = tmp_path / "det"
    assert main(["detect", "train", "--data", "builtin", "--output", str(run),
                 "--max-steps", "2", "--fpn-channels", "16", "--box-head-dim", "32",
                 "--mask-head-dim", "8", *tiny]) == 0
    assert {"model.pt", "metrics.jsonl", "curves.png", "checkpoint-00000002.pt"} <= {
        p.name for p in run.iterdir()}
    assert main(["detect", "train", "--data", "builtin", "--output", str(run),
                 "--max-steps", "2", *tiny]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["detect", "train", "--data", "builtin", "--output", str(run), "--resume",
                 "auto", "--max-steps", "3", "--fpn-channels", "16", "--box-head-dim", "32",
                 "--mask-head-dim", "8", "--lr", "2e-3", *tiny]) == 0
    # the lr may change on resume (noted); the image size may not (see test_cli_table)
    assert "resuming with changed lr (0.001 -> 0.002)" in capsys.readouterr().out
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "val"]
    assert steps == [2, 3]
    image = next((tmp_path / "cache" / "convnextv2").glob("scenes-*/detection/val/*.jpg"))
    assert main(["detect", "predict", "--checkpoint", str(run), str(image), "--output",
                 str(tmp_path / "pred"), "--score-thresh", "0"]) == 0
    assert (tmp_path / "pred" / f"{image.stem}.png").is_file()

    seg = tmp_path / "seg"
    assert main(["segment", "train", "--data", "builtin", "--output", str(seg), "--max-steps",
                 "2", "--channels", "16", "--aux-channels", "8", *tiny]) == 0
    assert main(["segment", "eval", "--checkpoint", str(seg / "model.pt"), "--data", "builtin",
                 "--batch-size", "16", "--workers", "0", "--no-progress"]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert main(["segment", "predict", "--checkpoint", str(seg), str(image), "--output",
                 str(tmp_path / "segpred")]) == 0
    assert (tmp_path / "segpred" / f"{image.stem}.png").is_file()
    # a detection model is not a segmentation model
    assert main(["segment", "predict", "--checkpoint", str(run / "model.pt"), str(image),
                 "--output", str(tmp_path / "x")]) == 2


def test_both_models_train_under_bf16_autocast():
    """``--amp bf16``: losses stay finite and gradients reach the backbone (CPU autocast)."""
    from convnextv2.detection import build_detector
    from convnextv2.segmentation import build_segmenter, segmentation_loss
    from convnextv2.training import autocast

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    det = build_detector(2, build_backbone(None, **TINY), min_size=64, max_size=64,
                         fpn_channels=16, box_head_dim=16, mask_head_dim=8)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:44] = 1
    target = [dict(boxes=torch.tensor([[12., 10, 44, 40]]), labels=torch.tensor([2]),
                   masks=masks)]
    with autocast(cpu, "bf16"):
        losses = det([torch.rand(3, 64, 64)], target)
    total = sum(v.float() for v in losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert det.backbone.body.body.stem.conv.weight.grad.abs().sum() > 0
    seg = build_segmenter(3, build_backbone(None, **TINY), channels=16, aux_channels=8)
    with autocast(cpu, "bf16"):
        out = seg(torch.rand(2, 3, 64, 64))
        loss = segmentation_loss(out, torch.randint(0, 3, (2, 64, 64)))["loss"]
    assert out["out"].dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss) and seg.backbone.body.stem.conv.weight.grad.abs().sum() > 0


def test_quick_transfer_demo(tmp_path, capsys):
    """``convnextv2 demo --task segmentation --quick``: pretrain, two runs, a table; a second
    call writes next to the first instead of into it."""
    from convnextv2.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--task", "segmentation", "--quick", "--output", str(out)]) == 0
    table = (out / "report" / "table.md").read_text()
    assert "| FCMAE-pretrained |" in table and "| from scratch |" in table
    assert {"prediction_pretrained.png", "prediction_scratch.png", "results.json"} <= {
        p.name for p in (out / "report").iterdir()}
    assert (out / "pretrain" / "encoder.safetensors").is_file()
    capsys.readouterr()
    assert main(["demo", "--task", "segmentation", "--quick", "--output", str(out),
                 "--pretrained", str(out / "pretrain" / "encoder.safetensors")]) == 0
    assert (tmp_path / "demo-2" / "report" / "table.md").is_file()
    assert "using the given encoder" in capsys.readouterr().out
