"""`convnextv2 pretrain`: exact resume, the files a run writes, loading them back, failures."""
import json

import pytest
import torch

from convnextv2 import training as T
from convnextv2.cli import main
from convnextv2.fcmae.io import load_fcmae
from convnextv2.recipes.pretrain import NonFiniteLossError, PretrainConfig, pretrain

from conftest import TOY_DEPTHS, TOY_DIMS

RUN_ARGS = ["--img-size", "32", "--batch-size", "4", "--decoder-dim", "16", "--workers", "0",
            "--deterministic", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_args(toy_cli):
    return [*toy_cli, *RUN_ARGS]


def tiny_config(data, output, **kw) -> PretrainConfig:
    base = dict(model="atto", depths=TOY_DEPTHS, dims=TOY_DIMS, stem_stride=1,
                img_size=32, batch_size=4, decoder_dim=16, workers=0, deterministic=True,
                progress=False, data=str(data), output=str(output), blr=1e-2, device="cpu")
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, make_images):
    """18 random 40x36 RGB PNGs in two class folders (labels are ignored by pretraining)."""
    return make_images(tmp_path_factory.mktemp("images"), 18, classes=["b", "a"], size=(40, 36))


def _has_tensorboard() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


def losses(run_dir):
    return [(r["step"], r["loss"], r["lr"]) for r in T.read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight_run(image_folder, tmp_path_factory, tiny_args):
    """2 epochs x 4 steps (18 images, batch 4: the last 2 images of each epoch are dropped)."""
    out = tmp_path_factory.mktemp("straight")
    tensorboard = ["--log-dir", str(out / "tb")] if _has_tensorboard() else []
    rc = main(["pretrain", *tiny_args, "--data", str(image_folder), "--output", str(out),
               "--epochs", "2", "--blr", "1e-2", "--recon-every", "2", *tensorboard])
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


def test_compiled_run_gives_the_eager_losses(straight_run, image_folder, tmp_path, monkeypatch,
                                             aot_eager_compile):
    """`pretrain --compile`: the same losses as the eager run (compiled with "aot_eager"; the
    inductor backend is covered per block in tests/test_compile.py)."""
    import convnextv2.recipes.pretrain as pretrain_module

    monkeypatch.setattr(pretrain_module, "_reconstruction_saver", lambda: None)
    monkeypatch.setattr(pretrain_module, "_plot_loss", lambda out: None)
    pretrain(tiny_config(image_folder, tmp_path, epochs=2, compile=True))
    assert aot_eager_compile, "--compile did not compile the model"
    reference = losses(straight_run)
    got = losses(tmp_path)
    assert [s for s, _, _ in got] == [s for s, _, _ in reference]
    for (_, loss, lr), (_, ref_loss, ref_lr) in zip(got, reference):
        assert lr == ref_lr
        assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)


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
    assert {"reconstruction.png", "reconstruction_ep0002.png"} <= names


def test_log_dir_holds_the_step_scalars_and_the_reconstructions(straight_run):
    if not _has_tensorboard():
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight_run / "tb"), size_guidance={"images": 0})
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(s, pytest.approx(v, rel=1e-6)) for s, v, _ in losses(straight_run)]
    # the epoch-2 figure and the final one, as logged PNGs of the figure's size
    images = events.Images("reconstruction")
    assert [e.step for e in images] == [8, 8]
    from PIL import Image
    with Image.open(straight_run / "reconstruction.png") as figure:
        assert (images[-1].width, images[-1].height) == figure.size


def test_fcmae_file_round_trips(straight_run, image_folder):
    state = T.load_run_state(straight_run / "checkpoint-00000008.pt")
    fcmae = load_fcmae(straight_run / "fcmae.safetensors")
    for k, v in fcmae.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    assert fcmae.patch_size == 8 and fcmae.proj.out_channels == 16


def test_encoder_loads_into_create_model(straight_run):
    from convnextv2 import create_model

    fcmae = load_fcmae(straight_run / "fcmae.safetensors")
    # an encoder-only file: loads into a classifier of any size (head left as initialised)
    model = create_model("atto", pretrained=str(straight_run / "encoder.safetensors"),
                         depths=TOY_DEPTHS, dims=TOY_DIMS, stem_stride=1)
    assert model.head.fc.out_features == 1000
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), fcmae.encoder.forward_features(x))
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                               fcmae.encoder.forward_head(fcmae.encoder.forward_features(x),
                                                          pre_logits=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(image_folder, tmp_path,
                                                                  monkeypatch):
    from convnextv2.fcmae.fcmae import FCMAE

    real, calls = FCMAE.forward, []

    def poisoned(self, imgs, mask=None, **kwargs):
        calls.append(1)
        loss, pred, mask = real(self, imgs, mask, **kwargs)
        return (loss * float("nan") if len(calls) == 3 else loss), pred, mask

    monkeypatch.setattr(FCMAE, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="optimizer step 3") as err:
        pretrain(tiny_config(image_folder, tmp_path, epochs=1, save_every_steps=2))
    assert err.value.checkpoint.name == "checkpoint-00000002.pt"
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt"]
    assert [r["step"] for r in T.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "encoder.safetensors").exists()


def test_unwritable_output_fails_before_any_work(tmp_path, capsys, tiny_args):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["pretrain", *tiny_args, "--data", str(tmp_path / "no-such-data"),
               "--output", str(blocker / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--output" in err and "cannot write" in err


def test_bad_image_size_and_small_data_are_user_errors(image_folder, tmp_path, capsys,
                                                      tiny_args):
    assert main(["pretrain", *tiny_args, "--img-size", "36", "--data", str(image_folder),
                 "--output", str(tmp_path / "a")]) == 2
    assert "multiple of the patch size 8" in capsys.readouterr().err
    assert main(["pretrain", *tiny_args, "--batch-size", "32", "--data", str(image_folder),
                 "--output", str(tmp_path / "b")]) == 2
    assert "too few for one optimizer step" in capsys.readouterr().err


def test_two_process_gloo_run_matches_one_process(straight_run, image_folder, tmp_path,
                                                  tiny_args):
    """torchrun, 2 CPU processes x batch 2 = the same images, masks and crops per step as one
    process x batch 4 (order, augmentation and masks are keyed by sample index)."""
    import os
    import subprocess
    import sys

    args = [a for a in tiny_args if a != "--deterministic"]
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


VECTORS = "/work/shared/vectors/convnextv2_interop_small.pt"


def _official_decoder(width: int, d3: int, out: int, seed: int = 0) -> dict:
    """Decoder tensors named and shaped as the official FCMAE saves them: ``proj`` (1x1 conv),
    ``mask_token`` (1, C, 1, 1), one dense ConvNeXt V2 block (GRN (1, 1, 1, 4C)), ``pred``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    c, h = width, 4 * width
    return {"proj.weight": r(c, d3, 1, 1), "proj.bias": r(c), "mask_token": r(1, c, 1, 1),
            "decoder.0.dwconv.weight": r(c, 1, 7, 7), "decoder.0.dwconv.bias": r(c),
            "decoder.0.norm.weight": 1 + r(c), "decoder.0.norm.bias": r(c),
            "decoder.0.pwconv1.weight": r(h, c), "decoder.0.pwconv1.bias": r(h),
            "decoder.0.grn.gamma": r(1, 1, 1, h), "decoder.0.grn.beta": r(1, 1, 1, h),
            "decoder.0.pwconv2.weight": r(c, h), "decoder.0.pwconv2.bias": r(c),
            "pred.weight": r(out, c, 1, 1), "pred.bias": r(out)}


def _reference_decoder(t: dict, latent, mask):
    """The official decoder written out in float64 from its tensors: proj, mask-token fill,
    dwconv 7x7, LayerNorm, Linear, GELU, GRN (norm over H, W; divided by its channel mean),
    Linear, residual, pred; returned as (N, L, p*p*C) like the loss reads it."""
    F = torch.nn.functional
    t = {k: v.double() for k, v in t.items()}
    x = F.conv2d(latent.double(), t["proj.weight"], t["proj.bias"])
    n, c, h, w = x.shape
    m = mask.reshape(n, 1, h, w).double()
    x = x * (1 - m) + t["mask_token"] * m
    y = F.conv2d(x, t["decoder.0.dwconv.weight"], t["decoder.0.dwconv.bias"], padding=3, groups=c)
    y = F.layer_norm(y.permute(0, 2, 3, 1), (c,), t["decoder.0.norm.weight"],
                     t["decoder.0.norm.bias"], eps=1e-6)
    y = F.gelu(F.linear(y, t["decoder.0.pwconv1.weight"], t["decoder.0.pwconv1.bias"]))
    gx = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    y = t["decoder.0.grn.gamma"] * (y * nx) + t["decoder.0.grn.beta"] + y
    y = F.linear(y, t["decoder.0.pwconv2.weight"], t["decoder.0.pwconv2.bias"])
    x = x + y.permute(0, 3, 1, 2)
    pred = F.conv2d(x, t["pred.weight"], t["pred.bias"])
    return pred.reshape(n, pred.shape[1], -1).transpose(1, 2)


def test_official_fcmae_file_with_its_decoder_loads_and_reconstructs(tmp_path, image_folder):
    """An official-layout FCMAE checkpoint: the shared vectors' sparse encoder (MinkowskiEngine
    names and shapes) plus a decoder of the official shapes, wrapped in ``model``."""
    from PIL import Image

    from convnextv2.checkpoint import load_model

    vectors = torch.load(VECTORS, weights_only=True)
    decoder = _official_decoder(16, 32, 32 * 32 * 3)  # patch 32 (stem 4), 3 channels
    path = tmp_path / "official_fcmae.pth"
    import argparse  # the official script pickles its options along with the weights
    torch.save({"model": {**vectors["official_fcmae_encoder"], **decoder}, "epoch": 1599,
                "args": argparse.Namespace(mask_ratio=0.6, norm_pix_loss=True)}, path)

    fcmae = load_fcmae(path)
    dense = load_model(vectors["official_dense"])  # the same network in the dense layout
    for k, v in dense.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(fcmae.encoder.state_dict()[k], v), k
    imgs = vectors["input"]  # 2 x 3 x 64 x 64: a 2 x 2 grid of 32 px patches
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.float32)
    fcmae.eval()
    with torch.no_grad():
        latent = fcmae.forward_encoder(imgs, mask)
        pred = fcmae.forward_decoder(latent, mask)
    ref = _reference_decoder(decoder, latent, mask)
    torch.testing.assert_close(pred.double(), ref, rtol=1e-4,
                               atol=1e-5 * ref.abs().max().item())

    # the reconstruct command draws the figure from the official file
    for i in range(2):
        pixels = (vectors["input"][i].permute(1, 2, 0).clamp(-2, 2) * 60 + 128).byte().numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    assert main(["reconstruct", str(tmp_path / "0.png"), str(tmp_path / "1.png"),
                 "--checkpoint", str(path), "--img-size", "64",
                 "--output", str(tmp_path / "recon.png")]) == 0
    assert (tmp_path / "recon.png").read_bytes()[:4] == b"\x89PNG"

    # and pretraining continues from it: encoder and decoder as loaded at step 1 (lr 0)
    pretrain(tiny_config(image_folder, tmp_path / "run", stem_stride=None, img_size=64,
                         epochs=1, max_steps=1, blr=0.0, init=str(path)))
    state = T.load_run_state(T.latest_checkpoint(tmp_path / "run"))
    for k, v in fcmae.state_dict().items():
        assert torch.equal(state["model"][k], v), k


def test_init_starts_from_an_fcmae_file_with_its_decoder(straight_run, image_folder, tmp_path):
    """``--init``: the first step of a new run starts from the given encoder and decoder."""
    source = load_fcmae(straight_run / "fcmae.safetensors")
    pretrain(tiny_config(image_folder, tmp_path, epochs=1, max_steps=1, blr=0.0,
                         init=str(straight_run / "fcmae.safetensors")))
    state = T.load_run_state(T.latest_checkpoint(tmp_path))
    for k, v in source.state_dict().items():  # lr 0 at the first step: weights as loaded
        assert torch.equal(state["model"][k], v), k
    with pytest.raises(ValueError, match="do not fit"):
        pretrain(tiny_config(image_folder, tmp_path / "other", decoder_dim=8,
                             init=str(straight_run / "fcmae.safetensors")))
