"""Released weights by name (issue 22, items 1-2): the catalogue, fetching with its caches and
failures, and RGB stems adapted to any number of input channels.

No test touches the network: the Hugging Face Hub is a monkeypatched ``hf_hub_download`` and
the official URL is a tiny HTTP server on 127.0.0.1 that serves a toy checkpoint under the
catalogue's file names (``$CONVNEXTV2_WEIGHTS_URL`` points the catalogue at it).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import convnextv2
from convnextv2.checkpoint import CATALOG, CheckpointError, convert_state_dict, list_pretrained
from convnextv2.checkpoint.catalog import default_tag
from convnextv2.checkpoint.loading import adapt_input_channels
from convnextv2.models.registry import create_model as architecture

from conftest import TOY, LocalFileServer, unreachable_weight_sources

SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (GRN starts at zero, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def official_bytes(model: torch.nn.Module, path: Path) -> bytes:
    """``model`` saved as the official release saves it: ``{"model": official-layout dict}``."""
    torch.save({"model": convert_state_dict(model.state_dict(), dst="official")}, path)
    return path.read_bytes()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An unreachable Hub and official URL with empty caches; ``hub.calls``: Hub requests."""
    return unreachable_weight_sources(monkeypatch, tmp_path)


@pytest.fixture
def server(monkeypatch):
    s = LocalFileServer()
    monkeypatch.setenv("CONVNEXTV2_WEIGHTS_URL", s.url)
    yield s
    s.close()


def _path(name: str) -> str:
    """The URL path the server must answer for a catalogue name."""
    return CATALOG[name].url.split("/convnextv2/", 1)[1].join(["/", ""])


# ---- the catalogue ---------------------------------------------------------------------------

def test_every_size_has_every_released_tag_and_nothing_is_shared():
    base = {"fcmae", "fcmae_ft_in1k"}
    in22k = {"fcmae_ft_in22k_in1k", "fcmae_ft_in22k_in1k_384"}
    expected = {**{s: base for s in ("atto", "femto", "pico")},
                **{s: base | in22k for s in ("nano", "tiny", "base", "large")},
                "huge": base | {"fcmae_ft_in22k_in1k_384", "fcmae_ft_in22k_in1k_512"}}
    found = {s: {e.tag for e in CATALOG.values() if e.variant == f"convnextv2_{s}"}
             for s in SIZES}
    assert found == expected
    assert len(CATALOG) == 26
    for field in ("url", "hub_id"):
        values = [getattr(e, field) for e in CATALOG.values()]
        assert len(set(values)) == len(values), field
    hf = [e.hf_id for e in CATALOG.values() if e.hf_id]
    assert len(set(hf)) == len(hf) == 18  # every classifier; FCMAE encoders are timm-only
    for e in CATALOG.values():
        assert e.url.startswith("https://dl.fbaipublicfiles.com/convnext/convnextv2/")
        assert (e.top1 is None) == e.encoder_only == (e.tag == "fcmae")


def test_catalogue_agrees_with_timms_pretrained_configs():
    """Every URL, hub id and preprocessing value equals the installed timm's own record."""
    import timm
    from timm.models import get_pretrained_cfg

    names = timm.list_pretrained("convnextv2*")
    assert sorted(names) == sorted(CATALOG)
    for name in names:
        ours, theirs = CATALOG[name], get_pretrained_cfg(name)
        assert ours.url == theirs.url and ours.hub_id == theirs.hf_hub_id, name
        assert (3, ours.input_size, ours.input_size) == tuple(theirs.input_size), name
        assert ours.crop_pct == theirs.crop_pct and ours.crop_mode == theirs.crop_mode, name
        assert ours.mean == tuple(theirs.mean) and ours.std == tuple(theirs.std), name
        assert ours.num_classes == theirs.num_classes, name
        assert (ours.interpolation, ours.license) == (theirs.interpolation, theirs.license)
    for size in SIZES:  # pretrained=True on a bare name means timm's default weights
        variant = f"convnextv2_{size}"
        assert default_tag(variant) == get_pretrained_cfg(variant).tag, variant


def test_paper_top1_in_the_table():
    """The paper's numbers (Tables 1 and 13 of ConvNeXt V2), spot-checked by hand."""
    top1 = {n: e.top1 for n, e in CATALOG.items()}
    assert top1["convnextv2_atto.fcmae_ft_in1k"] == 76.7
    assert top1["convnextv2_tiny.fcmae_ft_in1k"] == 83.0
    assert top1["convnextv2_base.fcmae_ft_in22k_in1k_384"] == 87.7
    assert top1["convnextv2_huge.fcmae_ft_in22k_in1k_512"] == 88.9
    assert top1["convnextv2_large.fcmae"] is None


def test_list_pretrained_patterns():
    assert convnextv2.list_pretrained() == list(CATALOG)
    assert list_pretrained("*_512") == ["convnextv2_huge.fcmae_ft_in22k_in1k_512"]
    assert list_pretrained("atto") == ["convnextv2_atto.fcmae", "convnextv2_atto.fcmae_ft_in1k"]
    assert len(list_pretrained("*.fcmae")) == 8
    assert list_pretrained("resnet*") == []


# ---- fetching: Hub, official URL, caches, failures -------------------------------------------

def test_pretrained_true_downloads_once_then_uses_the_cache(hub, server, tmp_path):
    name = "convnextv2_tiny.fcmae_ft_in22k_in1k_384"
    source = randomised(architecture("tiny", **TOY))
    server.files[_path(name)] = official_bytes(source, tmp_path / "src.pt")

    model = convnextv2.create_model(name, pretrained=True, **TOY).eval()
    assert hub.calls == [(CATALOG[name].hub_id, "model.safetensors")]  # tried first
    assert server.requests == [_path(name)]
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    assert model.load_report["pretrained"] == name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [CATALOG[name].filename]

    again = convnextv2.create_model("convnextv2_tiny", pretrained="fcmae_ft_in22k_in1k_384",
                                    **TOY).eval()
    assert server.requests == [_path(name)] and len(hub.calls) == 1  # no network at all
    torch.testing.assert_close(again(x), source(x), rtol=0, atol=0)


def test_hub_download_is_used_when_the_hub_answers(hub, server, tmp_path):
    """The Hub first (timm's safetensors, timm layout); the official URL is never asked."""
    from safetensors.torch import save_file

    source = randomised(architecture("tiny", num_classes=0, **TOY))
    hub.answer = tmp_path / "model.safetensors"
    save_file(convert_state_dict(source.state_dict(), dst="timm"), hub.answer)
    model = convnextv2.create_model("convnextv2_tiny", pretrained="fcmae", num_classes=0,
                                    **TOY).eval()
    assert hub.calls == [("timm/convnextv2_tiny.fcmae", "model.safetensors")]
    assert server.requests == []
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), source.forward_features(x))


def test_a_truncated_download_is_refused_in_one_line_and_not_cached(hub, server, tmp_path):
    name = "convnextv2_atto.fcmae_ft_in1k"
    server.files[_path(name)] = official_bytes(architecture("atto", **TOY), tmp_path / "a.pt")
    server.truncate.add(_path(name))
    with pytest.raises(CheckpointError) as err:
        convnextv2.create_model(name, pretrained=True, **TOY)
    text = str(err.value)
    assert "\n" not in text and "truncated" in text and _path(name) in text
    assert not any((tmp_path / "cache").iterdir())  # no torn file, no leftover .part


def test_a_page_that_is_no_checkpoint_is_refused(hub, server):
    name = "convnextv2_atto.fcmae"
    server.files[_path(name)] = b"<html><body>Service unavailable</body></html>"
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        convnextv2.create_model(name, pretrained=True, **TOY)


def test_offline_is_one_line_naming_both_sources_and_a_local_file(hub):
    name = "convnextv2_nano.fcmae_ft_in22k_in1k"
    with pytest.raises(CheckpointError) as err:
        convnextv2.create_model(name, pretrained=True)
    text = str(err.value)
    assert "\n" not in text
    for needle in ("timm/convnextv2_nano.fcmae_ft_in22k_in1k", "127.0.0.1:9",
                   CATALOG[name].url, "pretrained='/path/to/convnextv2_nano_22k_224_ema.pt'"):
        assert needle in text, needle


def test_an_unreleased_tag_lists_the_released_ones(hub):
    with pytest.raises(ValueError, match="fcmae_ft_in22k_in1k_384") as err:
        convnextv2.create_model("convnextv2_atto.fcmae_ft_in22k_in1k_384", pretrained=True)
    assert "fcmae, fcmae_ft_in1k" in str(err.value) and hub.calls == []
    with pytest.raises(ValueError, match="released: fcmae, fcmae_ft_in1k"):
        convnextv2.create_model("atto", pretrained="in22k")


def test_another_class_count_takes_a_fresh_head(hub, server, tmp_path):
    name = "convnextv2_pico.fcmae_ft_in1k"
    source = randomised(architecture("pico", **TOY))
    server.files[_path(name)] = official_bytes(source, tmp_path / "p.pt")
    model = convnextv2.create_model(name, pretrained=True, num_classes=7, **TOY)
    assert model.head.fc.out_features == 7 and model.load_report["head"].startswith("dropped")
    torch.testing.assert_close(model.stem.conv.weight, source.stem.conv.weight)


# ---- any number of input channels ------------------------------------------------------------

def test_grey_image_through_the_adapted_stem_equals_rgb_replicated(tmp_path):
    source = randomised(architecture("atto", num_classes=5, **TOY))
    path = tmp_path / "rgb.pt"
    official_bytes(source, path)
    grey = convnextv2.create_model("atto", pretrained=str(path), in_chans=1, num_classes=5,
                                   **TOY).eval()
    assert grey.load_report["stem"] == "adapted from 3 to 1 input channels (summed over RGB)"
    x = torch.randn(3, 1, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(grey.double()(x), source.double()(x.repeat(1, 3, 1, 1)))


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_stem_adaptation_matches_timm(k):
    from timm.models import adapt_input_conv

    weight = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(adapt_input_channels(weight, k), adapt_input_conv(k, weight))


def test_six_equal_channels_respond_like_the_rgb_image(tmp_path):
    """k a multiple of 3: the 3/k scale makes k copies of a grey image act like (g, g, g)."""
    source = randomised(architecture("atto", num_classes=5, **TOY))
    six = randomised(architecture("atto", num_classes=5, in_chans=6, **TOY), seed=1)
    report = convnextv2.load_checkpoint(six, source.state_dict())
    assert report["stem"].startswith("adapted from 3 to 6")
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(six.double()(x.repeat(1, 6, 1, 1)),
                               source.double()(x.repeat(1, 3, 1, 1)))


def test_a_non_rgb_stem_is_still_refused():
    two = architecture("atto", in_chans=2, **TOY)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        convnextv2.load_checkpoint(architecture("atto", in_chans=4, **TOY), two.state_dict())


def test_transfer_backbone_and_finetune_adapt_released_weights(hub, server, tmp_path):
    """A released name with --in-chans 1 works for the detection/segmentation backbone and
    for fine-tuning, each through the one name resolver."""
    from convnextv2.recipes.finetune_model import build_finetune_model
    from convnextv2.transfer.backbone import build_backbone

    name = "convnextv2_femto.fcmae"
    source = randomised(architecture("femto", num_classes=0, **TOY))
    server.files[_path(name)] = official_bytes(source, tmp_path / "f.pt")
    summed = source.stem.conv.weight.sum(1, keepdim=True)

    backbone = build_backbone(None, name, in_chans=1, out_norms=False)
    torch.testing.assert_close(backbone.body.stem.conv.weight, summed)
    model, report = build_finetune_model(None, 10, name, in_chans=1)
    torch.testing.assert_close(model.stem.conv.weight, summed)
    assert report["stem"].startswith("adapted from 3 to 1") and len(server.requests) == 1


def test_pretrain_init_takes_a_released_encoder_for_one_channel(hub, server, tmp_path):
    """``pretrain --init convnextv2_atto.fcmae --in-chans 1``: the encoder gets the summed
    stem, the decoder starts fresh, and the log line says both."""
    from conftest import make_tiny_fcmae
    from convnextv2.recipes.pretrain import load_init

    name = "convnextv2_atto.fcmae"
    source = randomised(architecture("atto", num_classes=0, stem_stride=1, **TOY))
    server.files[_path(name)] = official_bytes(source, tmp_path / "e.pt")
    fcmae = make_tiny_fcmae(in_chans=1)
    note = load_init(fcmae, name)
    assert note.startswith(f"--init {name}: encoder weights") and "adapted from 3 to 1" in note
    torch.testing.assert_close(fcmae.encoder.stem.conv.weight,
                               source.stem.conv.weight.sum(1, keepdim=True))
    torch.testing.assert_close(fcmae.encoder.stages[3].blocks[0].pwconv1.weight,
                               source.stages[3].blocks[0].pwconv1.weight)


def test_predict_takes_a_released_name(hub, server, tmp_path, capsys):
    """``predict --checkpoint NAME`` classifies with the fetched weights, at the entry's size
    unless --img-size says otherwise (ImageNet class names for a 1000-class head)."""
    from PIL import Image

    from convnextv2.cli import main

    name = "convnextv2_atto.fcmae_ft_in1k"
    source = randomised(architecture("atto", stem_stride=1, **TOY))
    server.files[_path(name)] = official_bytes(source, tmp_path / "c.pt")
    Image.new("RGB", (40, 40), (120, 30, 200)).save(tmp_path / "x.png")
    assert main(["predict", "--checkpoint", name, "--img-size", "32", "--topk", "1",
                 str(tmp_path / "x.png")]) == 0
    assert "x.png" in capsys.readouterr().out and len(server.requests) == 1


def test_an_fcmae_name_builds_an_encoder_as_timm_does(hub, server, tmp_path):
    """``convnextv2_atto.fcmae`` has no classifier: the model comes without one (timm's
    ``num_classes=0``) whether or not the file holds the final norm; asking for classes
    gives a fresh head."""
    name = "convnextv2_atto.fcmae"
    source = randomised(architecture("atto", num_classes=0, **TOY))
    without_norm = {k: v for k, v in convert_state_dict(source.state_dict(), dst="official")
                    .items() if not k.startswith("norm.")}  # as the official FCMAE files are
    torch.save({"model": without_norm}, tmp_path / "enc.pt")
    server.files[_path(name)] = (tmp_path / "enc.pt").read_bytes()
    encoder = convnextv2.create_model(name, pretrained=True, **TOY)
    assert encoder.config["num_classes"] == 0 and encoder.load_report["head"] == "absent"
    torch.testing.assert_close(encoder.stages[2].blocks[0].dwconv.weight,
                               source.stages[2].blocks[0].dwconv.weight)
    ten = convnextv2.create_model("convnextv2_atto", pretrained=name, num_classes=10, **TOY)
    assert ten.head.fc.out_features == 10 and len(server.requests) == 1


def test_convert_writes_a_released_checkpoint_in_another_layout(hub, server, tmp_path):
    """``convnextv2 convert NAME OUT --to timm``: fetched, converted, and timm's own model
    gives our logits from the file."""
    import timm
    from safetensors.torch import load_file

    from convnextv2.cli import main

    name = "convnextv2_nano.fcmae_ft_in22k_in1k"
    source = randomised(architecture("nano", **TOY))
    server.files[_path(name)] = official_bytes(source, tmp_path / "n.pt")
    out = tmp_path / "nano_timm.safetensors"
    assert main(["convert", name, str(out), "--to", "timm"]) == 0
    theirs = timm.create_model("convnextv2_nano", depths=TOY["depths"], dims=TOY["dims"],
                               num_classes=1000).eval()
    theirs.load_state_dict(load_file(out))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(theirs(x), source(x), rtol=1e-4, atol=1e-4)


def test_finetune_cli_from_a_released_name_on_one_channel_images(hub, server, tmp_path,
                                                                  capsys):
    """``finetune --finetune convnextv2_atto.fcmae --in-chans 1`` on the built-in grey
    images: one step runs, the log says the stem was adapted, config.json records it."""
    import json

    from conftest import TOY_FLAGS
    from convnextv2.cli import main

    name = "convnextv2_atto.fcmae"
    source = randomised(architecture("atto", num_classes=0, stem_stride=1, **TOY))
    server.files[_path(name)] = official_bytes(source, tmp_path / "e.pt")
    out = tmp_path / "ft"
    assert main(["finetune", "--model", "atto", *TOY_FLAGS, "--stem-stride", "1",
                 "--in-chans", "1", "--data", "builtin", "--img-size", "32", "--finetune", name,
                 "--output", str(out), "--epochs", "1", "--max-steps-per-epoch", "1",
                 "--batch-size", "4", "--val-subset", "8", "--aa", "none", "--mixup", "0",
                 "--cutmix", "0", "--reprob", "0", "--no-model-ema", "--workers", "0",
                 "--no-progress"]) == 0
    note = f"note: --finetune {name}: stem adapted from 3 to 1 input channels (summed over RGB)"
    assert note in capsys.readouterr().out
    report = json.loads((out / "config.json").read_text())["load_report"]
    assert report["stem"].startswith("adapted from 3 to 1")


def test_info_pretrained_lists_the_table_and_one_entry(capsys):
    from convnextv2.cli import main

    assert main(["info", "--pretrained"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    names = [r[0] for r in rows if r and r[0].startswith("convnextv2_")]
    assert names == list(CATALOG)
    assert ["convnextv2_huge.fcmae_ft_in22k_in1k_512", "512", "1.0", "88.9",
            "facebook/convnextv2-huge-22k-512"] in rows
    assert main(["info", "--pretrained", "convnextv2_tiny.fcmae_ft_in1k"]) == 0
    text = capsys.readouterr().out
    assert CATALOG["convnextv2_tiny.fcmae_ft_in1k"].url in text and "83.0%" in text
