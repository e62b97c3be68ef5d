"""`convnextv2 pretrain`: exact resume, the files a run writes, loading them back, failures."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2 import training as T
from convnextv2.cli import main
from convnextv2.fcmae.io import load_fcmae
from convnextv2.recipes.pretrain import NonFiniteLossError, PretrainConfig, pretrain

TINY_ARGS = ["--model", "atto", "--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32",
             "--stem-stride", "1", "--img-size", "32", "--batch-size", "4", "--decoder-dim", "16",
             "--workers", "0", "--deterministic", "--no-progress", "--device", "cpu"]


def tiny_config(data, output, **kw) -> PretrainConfig:
    base = dict(model="atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), stem_stride=1,
                img_size=32, batch_size=4, decoder_dim=16, workers=0, deterministic=True,
                progress=False, data=str(data), output=str(output), blr=1e-2, device="cpu")
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """18 random 40x36 RGB PNGs in two class folders (labels are ignored by pretraining)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(18):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def losses(run_dir):
    return [(r["step"], r["loss"], r["lr"]) for r in T.read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight_run(image_folder, tmp_path_factory):
    """2 epochs x 4 steps (18 images, batch 4: the last 2 images of each epoch are dropped)."""
    out = tmp_path_factory.mktemp("straight")
    rc = main(["pretrain", *TINY_ARGS, "--data", str(image_folder), "--output", str(out),
               "--epochs", "2", "--blr", "1e-2", "--recon-every", "2"])
    assert rc == 0
    return out


def test_resume_reproduces_the_uninterrupted_losses(straight_run, image_folder, tmp_path,
                                                    monkeypatch):
    import convnextv2.recipes.pretrain as pretrain_module

    # figures are covered by the straight run; skipping them here keeps the test fast
    monkeypatch.setattr(pretrain_module, "_reconstruction_saver", lambda: None)
    monkeypatch.setattr(pretrain_module, "_plot_loss", lambda out: None)
    reference = losses(straight_run)
    assert [s for s, _, _ in reference] == list(range(1, 9))
    # stop mid-epoch (step 3 of 4), resume, stop again at an epoch boundary, resume to the end
    for max_steps in (3, 4, None):
        cfg = tiny_config(image_folder, tmp_path, epochs=2, max_steps=max_steps, resume="auto",
                          save_every_steps=2)
        pretrain(cfg)
        if max_steps == 3:  # also: a stale temp file of a crashed write must be ignored
            (tmp_path / ".checkpoint-00000099.pt.x.tmp").write_bytes(b"junk")
            # and lines logged after the checkpoint by the "crashed" run are dropped on resume
            with open(tmp_path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(dict(step=4, loss=123.0)) + "\n")
    assert losses(tmp_path) == reference  # bit-identical losses and learning rates
    assert len(set(loss for _, loss, _ in reference)) > 1


def test_run_writes_every_file(straight_run):
    names = {p.name for p in straight_run.iterdir()}
    assert {"metrics.jsonl", "loss_curve.png", "encoder.safetensors", "fcmae.safetensors",
            "checkpoint-00000004.pt", "checkpoint-00000008.pt"} <= names
    assert (straight_run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    record = T.read_metrics(straight_run / "metrics.jsonl")[0]
    assert {"step", "epoch", "loss", "lr", "img_per_s"} <= set(record)
    # warmup: 40 recipe epochs capped to a quarter of 2 epochs = 2 of the 8 steps; lr peak =
    # blr * 4 / 256, reached at step 2 (the lr of step index 2 is logged on line 3)
    peak = 1e-2 * 4 / 256
    assert [lr for _, _, lr in losses(straight_run)][:3] == pytest.approx([0, peak / 2, peak])
    state = T.load_run_state(straight_run / "checkpoint-00000008.pt")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (2, 0, 8)
    assert state["args"]["depths"] == [1, 1, 1, 1]
    try:
        import convnextv2.analysis.reconstruction  # noqa: F401
    except ImportError:
        return
    assert {"reconstruction.png", "reconstruction_ep0002.png"} <= names


def test_fcmae_file_round_trips(straight_run, image_folder):
    state = T.load_run_state(straight_run / "checkpoint-00000008.pt")
    fcmae = load_fcmae(straight_run / "fcmae.safetensors")
    for k, v in fcmae.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    assert fcmae.patch_size == 8 and fcmae.proj.out_channels == 16


def test_encoder_loads_into_create_model(straight_run):
    ckpt = pytest.importorskip("convnextv2.checkpoint")
    if not hasattr(ckpt, "load_pretrained"):
        pytest.skip("convnextv2.checkpoint is not complete yet")
    from convnextv2.models.registry import create_model

    fcmae = load_fcmae(straight_run / "fcmae.safetensors")
    # an encoder-only file: loads into a classifier of any size (head left as initialised)
    model = create_model("atto", pretrained=str(straight_run / "encoder.safetensors"),
                         depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), stem_stride=1)
    assert model.head.fc.out_features == 1000
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), fcmae.encoder.forward_features(x))
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                               fcmae.encoder.forward_head(fcmae.encoder.forward_features(x),
                                                          pre_logits=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(image_folder, tmp_path,
                                                                  monkeypatch):
    from convnextv2.fcmae.fcmae import FCMAE

    real, calls = FCMAE.forward_loss, []

    def poisoned(self, imgs, pred, mask):
        calls.append(1)
        loss = real(self, imgs, pred, mask)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(FCMAE, "forward_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="optimizer step 3") as err:
        pretrain(tiny_config(image_folder, tmp_path, epochs=1, save_every_steps=2))
    assert err.value.checkpoint.name == "checkpoint-00000002.pt"
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt"]
    assert [r["step"] for r in T.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "encoder.safetensors").exists()


def test_unwritable_output_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["pretrain", *TINY_ARGS, "--data", str(tmp_path / "no-such-data"),
               "--output", str(blocker / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--output" in err and "cannot write" in err


def test_bad_image_size_and_small_data_are_user_errors(image_folder, tmp_path, capsys):
    assert main(["pretrain", *TINY_ARGS, "--img-size", "36", "--data", str(image_folder),
                 "--output", str(tmp_path / "a")]) == 2
    assert "multiple of the patch size 8" in capsys.readouterr().err
    assert main(["pretrain", *TINY_ARGS, "--batch-size", "32", "--data", str(image_folder),
                 "--output", str(tmp_path / "b")]) == 2
    assert "too few for one optimizer step" in capsys.readouterr().err


def test_two_process_gloo_run_matches_one_process(straight_run, image_folder, tmp_path):
    """torchrun, 2 CPU processes x batch 2 = the same images, masks and crops per step as one
    process x batch 4 (order, augmentation and masks are keyed by sample index)."""
    import os
    import subprocess
    import sys

    args = [a for a in TINY_ARGS if a != "--deterministic"]
    args[args.index("--batch-size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "convnextv2", "pretrain", *args, "--data", str(image_folder), "--output",
         str(tmp_path), "--epochs", "2", "--blr", "1e-2", "--recon-every", "0"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = losses(straight_run), losses(tmp_path)
    assert [s for s, _, _ in two] == [s for s, _, _ in one]
    assert [lr for _, _, lr in two] == pytest.approx([lr for _, _, lr in one])
    assert [v for _, v, _ in two] == pytest.approx([v for _, v, _ in one], rel=1e-5, abs=1e-6)
    assert (tmp_path / "encoder.safetensors").is_file()
