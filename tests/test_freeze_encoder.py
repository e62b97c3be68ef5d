"""`pretrain --init ENCODER --freeze-encoder`: a decoder fitted to a given encoder (issue 22, 5).

The encoder here comes as a timm-layout classifier file (what a user downloads from the Hub):
after a short run its weights must be bit-identical, the decoder must have moved, the
reconstruction loss must have fallen, and the run's fcmae.safetensors must reconstruct.
"""
import json

import pytest
import torch

from convnextv2 import training as T
from convnextv2.checkpoint import load_checkpoint, save_checkpoint
from convnextv2.cli import main
from convnextv2.fcmae.io import load_fcmae
from convnextv2.models.registry import create_model

from conftest import TOY

RUN = ["--model", "atto", "--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32",
       "--stem-stride", "1", "--img-size", "32", "--batch-size", "4", "--decoder-dim", "16",
       "--workers", "0", "--deterministic", "--no-progress", "--device", "cpu",
       "--recon-every", "0", "--keep-last", "0"]


@pytest.fixture(scope="module")
def timm_encoder(tmp_path_factory):
    """A toy 2-class classifier in timm's layout, with GRN away from its zero init."""
    torch.manual_seed(7)
    model = create_model("atto", num_classes=2, stem_stride=1, **TOY)
    with torch.no_grad():
        for block in (b for s in model.stages for b in s.blocks):
            block.grn.gamma.normal_(0, 0.5)
            block.grn.beta.normal_(0, 0.1)
    return save_checkpoint(model, tmp_path_factory.mktemp("timm") / "toy_timm.safetensors",
                           layout="timm")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """18 smooth images (random colour ramps and waves): a masked patch is predictable from
    its surroundings, unlike in random noise, so a decoder has something to learn."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40] / 40.0
    for i in range(18):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.5, 2.0)
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        colour = rng.uniform(0.2, 1.0, 3)
        pixels = 127.5 * (1 + wave[..., None] * colour)
        (root / "ab"[i % 2]).mkdir(exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(root / "ab"[i % 2] / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def frozen_run(timm_encoder, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen")
    rc = main(["pretrain", *RUN, "--data", str(images), "--output", str(out), "--epochs", "6",
               "--lr", "2e-2", "--init", str(timm_encoder), "--freeze-encoder"])
    assert rc == 0
    return out


def _encoder(state: dict) -> dict:
    return {k[len("encoder."):]: v for k, v in state.items()
            if k.startswith("encoder.") and not k.startswith("encoder.head.")}


def test_the_encoder_is_bit_identical_and_the_decoder_moved(frozen_run, timm_encoder):
    expected = create_model("atto", num_classes=0, stem_stride=1, **TOY)
    load_checkpoint(expected, timm_encoder, strict=True, drop_head=True)
    expected = {k: v for k, v in expected.state_dict().items() if not k.startswith("head.")}
    states = [T.load_run_state(p)["model"] for p in sorted(frozen_run.glob("checkpoint-*.pt"))]
    assert len(states) == 6  # one per epoch (--keep-last 0 keeps them all)
    final = load_fcmae(frozen_run / "fcmae.safetensors").state_dict()
    for state in (*states, final):
        got = _encoder(state)
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(got[k], v), k  # bit for bit, not merely close
    decoder = [k for k in final if not k.startswith("encoder.")]
    assert "mask_token" in decoder and any(k.startswith("decoder.") for k in decoder)
    for k in decoder:
        assert not torch.equal(states[0][k], final[k]), f"{k} did not train"


def test_the_optimizer_holds_only_the_decoder_and_mask_token(frozen_run):
    state = T.load_run_state(sorted(frozen_run.glob("checkpoint-*.pt"))[-1])
    fcmae = load_fcmae(frozen_run / "fcmae.safetensors")
    trainable = sum(v.numel() for k, v in fcmae.named_parameters() if not k.startswith("encoder."))
    held = sum(s["exp_avg"].numel() for s in state["optimizer"]["state"].values())
    assert held == trainable


def test_the_reconstruction_loss_fell(frozen_run):
    """Mean loss of the first epoch against the last, from the step log, independently of the
    summary; and the summary reports the same two numbers."""
    records = T.read_metrics(frozen_run / "metrics.jsonl")
    by_epoch = {}
    for r in records:
        by_epoch.setdefault(r["epoch"], []).append(r["loss"])
    first, last = (sum(v) / len(v) for v in (by_epoch[1], by_epoch[6]))
    assert last < 0.95 * first, (first, last)
    summary = json.loads((frozen_run / "summary.json").read_text())
    assert summary["first_epoch_loss"] == pytest.approx(first, rel=1e-9)
    assert summary["last_epoch_loss"] == pytest.approx(last, rel=1e-9)


def test_the_loss_on_fixed_images_and_masks_fell(frozen_run, images):
    """Without the augmentation's noise: every image, uncropped, under four fixed masks, scored
    by the decoder after the first epoch and at the end."""
    from convnextv2.data import build_dataset, eval_transform

    data = build_dataset(str(images), "train", eval_transform(32, 3, crop_pct=1.0))
    imgs = torch.stack([data[i][0] for i in range(len(data))])
    fcmae = load_fcmae(frozen_run / "fcmae.safetensors").eval()
    generator = torch.Generator().manual_seed(0)
    masks = [fcmae.random_mask(imgs, generator=generator) for _ in range(4)]

    def loss(state):
        fcmae.load_state_dict(state)
        with torch.no_grad():
            return sum(fcmae(imgs, m)[0].item() for m in masks) / len(masks)
    after_one = loss(T.load_run_state(sorted(frozen_run.glob("checkpoint-*.pt"))[0])["model"])
    final = loss(load_fcmae(frozen_run / "fcmae.safetensors").state_dict())
    assert final < after_one - 0.02, (after_one, final)  # 0.978 -> 0.936 measured


def test_the_run_records_the_frozen_encoder(frozen_run):
    summary = json.loads((frozen_run / "summary.json").read_text())
    config = json.loads((frozen_run / "config.json").read_text())
    state = T.load_run_state(sorted(frozen_run.glob("checkpoint-*.pt"))[-1])
    assert summary["freeze_encoder"] is True and summary["config"]["freeze_encoder"] is True
    assert config["freeze_encoder"] is True and state["args"]["freeze_encoder"] is True
    assert summary["global_step"] == 24 and summary["init"].endswith("toy_timm.safetensors")


def test_reconstruct_works_from_the_run(frozen_run, images, tmp_path):
    png = tmp_path / "recon.png"
    assert main(["reconstruct", "--checkpoint", str(frozen_run / "fcmae.safetensors"),
                 str(images / "a" / "0.png"), "--img-size", "32", "--output", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_resume_must_keep_the_encoder_frozen(frozen_run, timm_encoder, images, capsys):
    before = {p.name: p.read_bytes() for p in frozen_run.iterdir() if p.is_file()}
    rc = main(["pretrain", *RUN, "--data", str(images), "--output", str(frozen_run),
               "--epochs", "5", "--lr", "3e-3", "--init", str(timm_encoder), "--resume", "auto"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "freeze_encoder" in err, err
    assert {p.name: p.read_bytes() for p in frozen_run.iterdir() if p.is_file()} == before


def test_freeze_encoder_without_init_is_refused(images, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", *RUN, "--data", str(images), "--output", str(out),
               "--freeze-encoder"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--freeze-encoder" in lines[0] and "--init" in lines[0]
    assert not out.exists() or not any(out.iterdir())
