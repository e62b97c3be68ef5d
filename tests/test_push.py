"""`convnextv2 push` / `push_to_hub` (issue 22, item 4): the folder a Hub user gets.

The references are the libraries users load such folders with: timm (through our
``pretrained_cfg_overlay`` file and through its own ``local-dir:`` reader of config.json) and
transformers (``ConvNextV2ForImageClassification`` and ``AutoImageProcessor``). No network:
the upload goes to a stand-in ``HfApi`` that records what it was given.
"""
import json
import shlex

import pytest
import torch

from convnextv2.checkpoint import load_model
from convnextv2.cli import main

from conftest import TOY_FLAGS

TINY = [*TOY_FLAGS, "--stem-stride", "1", "--img-size", "32", "--batch-size", "4", "--workers",
        "0", "--no-progress", "--device", "cpu", "--epochs", "2"]
FT = ["finetune", "--model", "atto", *TINY, "--aa", "none", "--mixup", "0", "--cutmix", "0",
      "--reprob", "0", "--max-steps-per-epoch", "2"]
PRE = ["pretrain", "--model", "atto", *TINY, "--decoder-dim", "16", "--recon-every", "0"]


def _close(a, b):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-3)
    assert (a - b).abs().max().item() <= 1e-4 * scale, (a - b).abs().max().item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("push")
    for split in ("train", "val"):
        make_images(root / "data" / split, 8, seed=len(split), classes=["cat", "dog", "eel"])
    assert main([*FT, "--data", str(root / "data"), "--output", str(root / "ft")]) == 0
    assert main([*PRE, "--data", str(root / "data"), "--output", str(root / "pre")]) == 0
    return root


@pytest.fixture(scope="module")
def timm_folder(runs):
    assert main(["push", str(runs / "ft"), "me/toy-cats", "--dry-run", str(runs / "up_timm"),
                 "--license", "apache-2.0"]) == 0
    return runs / "up_timm"


@pytest.fixture(scope="module")
def hf_folder(runs):
    assert main(["push", str(runs / "ft"), "me/toy-cats", "--layout", "hf", "--dry-run",
                 str(runs / "up_hf")]) == 0
    return runs / "up_hf"


def _ours(runs):
    summary = json.loads((runs / "ft" / "summary.json").read_text())
    model = load_model(runs / "ft" / f"{summary['best'].rsplit('/', 1)[-1]}").eval()
    return model, summary


def test_timm_folder_loads_through_pretrained_cfg_overlay_and_gives_our_logits(runs, timm_folder):
    timm = pytest.importorskip("timm")
    ours, _ = _ours(runs)
    config = json.loads((timm_folder / "config.json").read_text())
    theirs = timm.create_model(
        config["architecture"], pretrained=True, num_classes=config["num_classes"],
        **config["model_args"],
        pretrained_cfg_overlay=dict(file=str(timm_folder / "model.safetensors"),
                                    num_classes=config["num_classes"])).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(ours(x), theirs(x))


def test_timm_reads_the_config_json_itself(runs, timm_folder):
    """timm's own reader of a Hub folder (``local-dir:``): the architecture arguments, label
    names and preprocessing all come from our config.json."""
    timm = pytest.importorskip("timm")
    ours, _ = _ours(runs)
    theirs = timm.create_model(f"local-dir:{timm_folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(ours(x), theirs(x))
    assert list(theirs.pretrained_cfg["label_names"]) == ["cat", "dog", "eel"]
    data = timm.data.resolve_data_config({}, model=theirs)
    assert data["input_size"] == (3, 32, 32) and data["interpolation"] == "bicubic"
    assert data["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert data["std"] == pytest.approx((0.229, 0.224, 0.225))
    assert data["crop_pct"] == 1.0  # the recipe's value below 64 px (0.875 from 64 to 383)


def test_hf_folder_loads_in_transformers_and_gives_our_logits(runs, hf_folder):
    transformers = pytest.importorskip("transformers")
    ours, _ = _ours(runs)
    theirs = transformers.ConvNextV2ForImageClassification.from_pretrained(hf_folder).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(ours(x), theirs(pixel_values=x).logits)
    assert theirs.config.id2label == {0: "cat", 1: "dog", 2: "eel"}
    processor = transformers.AutoImageProcessor.from_pretrained(hf_folder)
    assert type(processor).__name__.startswith("ConvNextImageProcessor")
    assert processor.size == {"shortest_edge": 32} and processor.crop_pct == 1.0
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    # a 40x36 image comes out as the model's 32x32 input, normalised with our statistics
    import numpy as np
    pixels = processor(np.full((36, 40, 3), 255, np.uint8), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    _close(pixels[0, :, 16, 16], expected)


def test_card_names_the_run_metrics_and_the_command_that_repeats_it(runs, timm_folder,
                                                                    tmp_path):
    from convnextv2.cli import build_parser
    from convnextv2.cli._config_file import parse_command_line
    from convnextv2.tools.stats import count_params

    ours, summary = _ours(runs)
    card = (timm_folder / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: apache-2.0" in front and "library_name: timm" in front
    assert f"{summary['best_top1']:.2f}" in card and "top-1" in card
    assert f"{summary['final']['val_loss']:.4f}" in card
    assert f"{summary['final']['train_loss']:.4f}" in card
    assert f"{count_params(ours) / 1e6:.2f}M" in card and "GMACs" in card
    assert "cat, dog, eel" in card and str(runs / "data") in card
    assert "small-image rule" in card  # 32 px: evaluated without a resize
    # the command on the card, with the uploaded config.yaml, gives the run's options back
    command = card.split("```bash\n")[1].split("\n```")[0]
    words = shlex.split(command.replace("config.yaml", str(timm_folder / "config.yaml"))
                        .replace("NEW_RUN_FOLDER", str(tmp_path / "again")))
    assert words[:3] == ["convnextv2", "finetune", "--config"]
    assert (timm_folder / "config.yaml").read_bytes() == (runs / "ft" / "config.yaml").read_bytes()
    again = vars(parse_command_line(build_parser(), words[1:]))
    recorded = json.loads((runs / "ft" / "config.json").read_text())["config"]
    for key in ("model", "depths", "dims", "stem_stride", "img_size", "epochs", "batch_size",
                "mixup", "cutmix", "max_steps_per_epoch", "data"):
        got = again[key]
        assert (list(got) if isinstance(got, tuple) else got) == recorded[key], key


def test_fcmae_encoder_card_has_the_losses_and_the_reconstruction_grid(runs, tmp_path):
    out = tmp_path / "up"
    assert main(["push", str(runs / "pre"), "me/toy-fcmae", "--dry-run", str(out)]) == 0
    summary = json.loads((runs / "pre" / "summary.json").read_text())
    card = (out / "README.md").read_text()
    assert f"{summary['last_epoch_loss']:.4f}" in card
    assert f"{summary['first_epoch_loss']:.4f}" in card
    assert "![FCMAE reconstructions](reconstruction.png)" in card
    assert "license: cc-by-nc-4.0" in card and "pipeline_tag: image-feature-extraction" in card
    assert (out / "reconstruction.png").read_bytes() == \
        (runs / "pre" / "reconstruction.png").read_bytes()
    assert "convnextv2 pretrain --config config.yaml" in card
    assert "decoder_dim: 16" in (out / "config.yaml").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and "label_names" not in config
    encoder = load_model(runs / "pre" / "encoder.safetensors").eval()
    timm = pytest.importorskip("timm")
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(encoder.forward_features(x), theirs.forward_features(x))


def test_fcmae_encoder_in_hf_layout_loads_as_convnextv2_model(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "up"
    assert main(["push", str(runs / "pre"), "me/toy-fcmae", "--layout", "hf", "--dry-run",
                 str(out)]) == 0
    encoder = load_model(runs / "pre" / "encoder.safetensors").eval()
    theirs = transformers.ConvNextV2Model.from_pretrained(out).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(encoder.forward_features(x), theirs(pixel_values=x).last_hidden_state)
    assert "ConvNextV2Model" in (out / "README.md").read_text()


class _RecordingApi:
    """A stand-in for ``huggingface_hub.HfApi``: records the calls and the uploaded files."""
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, dict(kwargs, files=files)))
        return type("CommitInfo", (), {"commit_url": f"https://hub.test/{repo_id}/commit/1"})()


def test_push_creates_the_repo_and_uploads_the_dry_run_folder(runs, timm_folder, monkeypatch,
                                                             capsys):
    import huggingface_hub

    _RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingApi)
    assert main(["push", str(runs / "ft"), "me/toy-cats", "--private", "--license",
                 "apache-2.0"]) == 0
    assert "https://hub.test/me/toy-cats/commit/1" in capsys.readouterr().out
    (create, repo, options), (upload, repo2, sent) = _RecordingApi.calls
    assert (create, repo, upload, repo2) == ("create_repo", "me/toy-cats", "upload_folder",
                                             "me/toy-cats")
    assert options["private"] is True and options["exist_ok"] is True
    assert sent["repo_type"] == "model"
    # the exact folder --dry-run wrote, byte for byte
    assert sent["files"] == {p.name: p.read_bytes() for p in timm_folder.iterdir()}


def test_a_failed_upload_is_one_line_and_exit_1(runs, monkeypatch, capsys):
    import huggingface_hub

    class Offline(_RecordingApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    assert main(["push", str(runs / "ft"), "me/toy-cats"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "me/toy-cats" in err and "Connection refused" in err and "--dry-run" in err


def test_overwrite_replaces_an_earlier_push_folder_only(runs, tmp_path, capsys):
    out = tmp_path / "up"
    assert main(["push", str(runs / "ft"), "me/a", "--dry-run", str(out)]) == 0
    assert main(["push", str(runs / "ft"), "me/b", "--dry-run", str(out), "--overwrite"]) == 0
    assert "# b" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["up"]  # no temp folder left
    (out / "notes.txt").write_text("mine")
    assert main(["push", str(runs / "ft"), "me/c", "--dry-run", str(out), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").exists()


def test_push_to_hub_is_the_python_api(runs, tmp_path):
    import convnextv2

    out = convnextv2.push_to_hub(runs / "ft" / "best.safetensors", "me/file-only",
                                 layout="hf", dry_run=tmp_path / "up")
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == [
        "README.md", "config.json", "config.yaml", "model.safetensors",
        "preprocessor_config.json"]  # a file inside a run folder: that run's config.yaml too
    assert out == str(tmp_path / "up")
