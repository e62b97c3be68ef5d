"""Loading, saving, error messages, metadata, hub ids and the ``convert`` command."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

import convnextv2.checkpoint as ckpt
from convnextv2.checkpoint import (CheckpointError, convert_state_dict, create_model,
                                   detect_layout, infer_config, load_checkpoint, load_model,
                                   load_pretrained, read_metadata, save_checkpoint)
from convnextv2.cli import main as cli_main
from convnextv2.models.model import ConvNeXtV2

from conftest import TOY as SMALL
from conftest import TOY_DIMS



def small(num_classes=5, **kw) -> ConvNeXtV2:
    return ConvNeXtV2(num_classes=num_classes, **{**SMALL, **kw}).eval()


def randomised(model: ConvNeXtV2, seed: int = 0) -> ConvNeXtV2:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1 if p.dim() == 1 else 0))
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module, skip=()) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items()
               if not k.startswith(tuple(skip)))


class Custom:  # a class the safe unpickler must refuse
    def __init__(self):
        self.x = 1


# ---- sources and wrappers --------------------------------------------------------------

@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"model_ema": sd},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"model": sd, "model_ema": {k: torch.zeros_like(v) for k, v in sd.items()}},
])
def test_wrapped_state_dicts_load(wrap, tmp_path):
    source = randomised(small())
    official = convert_state_dict(source.state_dict(), dst="official")
    obj = wrap(official)
    for src in (obj, tmp_path / "w.pth"):
        if isinstance(src, Path):
            torch.save(obj, src)
        target = small()
        report = load_checkpoint(target, src)
        assert report["layout"] == "official" and report["head"] == "loaded"
        assert same_weights(source, target)


def test_key_argument_picks_the_ema_weights():
    source, ema = randomised(small(), 1), randomised(small(), 2)
    obj = {"model": source.state_dict(), "model_ema": ema.state_dict()}
    target = small()
    load_checkpoint(target, obj, key="model_ema")
    assert same_weights(ema, target)
    with pytest.raises(CheckpointError, match="no entry 'ema'.*model, model_ema"):
        load_checkpoint(target, obj, key="ema")


def test_official_checkpoint_with_argparse_namespace_loads(tmp_path):
    source = randomised(small())
    path = tmp_path / "convnextv2_ema.pt"
    torch.save({"model": convert_state_dict(source.state_dict(), dst="official"),
                "args": argparse.Namespace(lr=4e-3, model="convnextv2_atto"), "epoch": 99}, path)
    target = small()
    load_checkpoint(target, path)
    assert same_weights(source, target)


def test_pickle_with_custom_class_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": small().state_dict(), "extra": Custom()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(small(), path)
    text = str(err.value)
    assert str(path) in text and "weights_only" in text and "untrusted" in text
    assert "Custom" in text  # names what it refused


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file_names_the_file(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    layout = "native" if suffix == ".safetensors" else "official"
    save_checkpoint(randomised(small()), path, layout=layout)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(small(), path)
    assert str(path) in str(err.value)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt") as err:
        load_checkpoint(small(), tmp_path / "nothing.pt")
    assert isinstance(err.value, CheckpointError)
    with pytest.raises(CheckpointError, match="model.safetensors or pytorch_model.bin"):
        load_checkpoint(small(), tmp_path)


def test_unknown_layout_names_known_layouts_and_shows_keys():
    sd = {"backbone.layer1.conv.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(small(), sd)
    text = str(err.value)
    assert "unknown checkpoint layout" in text and "backbone.layer1.conv.weight" in text
    for layout in ("native", "official", "official_fcmae", "timm", "hf"):
        assert layout in text


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# ---- head handling ---------------------------------------------------------------------

def test_head_mismatch_needs_drop_head():
    source = randomised(small(num_classes=1000))
    target = small(num_classes=10)
    with pytest.raises(CheckpointError, match=r"checkpoint head has 1000 classes, model has 10; "
                                              r"pass drop_head=True to re-initialise it"):
        load_checkpoint(target, source.state_dict())
    initial_fc = {k: v.clone() for k, v in target.head.fc.state_dict().items()}
    report = load_checkpoint(target, source.state_dict(), drop_head=True)
    assert report["head"].startswith("dropped")
    assert all(torch.equal(v, target.head.fc.state_dict()[k]) for k, v in initial_fc.items())
    assert same_weights(source, target, skip=("head.fc",))


def test_encoder_only_checkpoint_needs_drop_head_or_none():
    source = randomised(small())
    encoder_sd = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    with pytest.raises(CheckpointError, match="missing from the checkpoint: head.norm.weight"):
        load_checkpoint(small(), encoder_sd, drop_head=False)
    for drop_head in (True, None):
        target = small()
        report = load_checkpoint(target, encoder_sd, drop_head=drop_head)
        assert report["head"] == "absent"
        assert same_weights(source, target, skip=("head.",))


def test_none_drop_head_still_refuses_a_mismatched_head():
    with pytest.raises(CheckpointError, match="checkpoint head has 5 classes, model has 3"):
        load_checkpoint(small(num_classes=3), randomised(small()).state_dict(), drop_head=None)


def test_wrong_variant_names_mis_shaped_keys():
    atto = create_model("convnextv2_atto", num_classes=10)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create_model("convnextv2_femto", num_classes=10), atto.state_dict())
    text = str(err.value)
    assert "mis-shaped" in text
    assert "stem.conv.weight checkpoint (40, 3, 4, 4) vs model (48, 3, 4, 4)" in text
    assert "convnextv2_atto" in text  # says what the checkpoint is
    assert err.value.mismatched["stem.conv.weight"] == ((40, 3, 4, 4), (48, 3, 4, 4))


def test_unexpected_keys_strict_and_not():
    source = randomised(small()).state_dict()
    sd = dict(source, **{"stages.0.blocks.0.layer_scale": torch.ones(8)})
    with pytest.raises(CheckpointError, match="unexpected in the checkpoint: stages.0.blocks.0.layer_scale"):
        load_checkpoint(small(), sd)
    report = load_checkpoint(small(), sd, strict=False)
    assert report["unexpected"] == ["stages.0.blocks.0.layer_scale"]


# ---- FCMAE checkpoints -----------------------------------------------------------------

def _fake_decoder(prefix=""):
    return {f"{prefix}proj.weight": torch.zeros(4, 32, 1, 1), f"{prefix}mask_token": torch.zeros(1, 4, 1, 1),
            f"{prefix}decoder.0.dwconv.weight": torch.zeros(4, 1, 7, 7),
            f"{prefix}pred.weight": torch.zeros(48, 4, 1, 1)}


@pytest.mark.parametrize("with_prefix", [True, False])
def test_official_fcmae_with_decoder_keys(with_prefix):
    source = randomised(small())
    sd = convert_state_dict(source.state_dict(), dst="official_fcmae")
    sd = {k: v for k, v in sd.items() if not k.startswith(("encoder.head.", "encoder.norm."))}
    if not with_prefix:
        sd = {k[len("encoder."):]: v for k, v in sd.items()}
    sd.update(_fake_decoder())
    assert detect_layout(sd) == "official_fcmae"
    assert sd["stages.0.0.dwconv.kernel" if not with_prefix else "encoder.stages.0.0.dwconv.kernel"].shape == (49, 8)
    target = small()
    report = load_checkpoint(target, {"model": sd}, drop_head=True)
    assert sorted(report["ignored"]) == sorted(_fake_decoder())
    assert same_weights(source, target, skip=("head.",))
    assert infer_config(sd)["num_classes"] == 0


def test_our_fcmae_training_checkpoint_loads_the_encoder():
    source = randomised(small(num_classes=0))
    sd = {f"encoder.{k}": v for k, v in source.state_dict().items()}
    sd.update(_fake_decoder())
    assert detect_layout(sd) == "native"
    target = small(num_classes=0)
    report = load_checkpoint(target, sd)
    assert len(report["ignored"]) == 4 and same_weights(source, target)


def test_real_fcmae_module_state_dict_loads():
    fcmae_mod = pytest.importorskip("convnextv2.fcmae.fcmae")
    fcmae = fcmae_mod.FCMAE(randomised(small(num_classes=0)), decoder_embed_dim=16, backend="dense")
    target = small(num_classes=0)
    report = load_checkpoint(target, fcmae.state_dict())
    assert report["ignored"] and same_weights(fcmae.encoder, target)


# ---- saving, metadata, building from a file --------------------------------------------

def test_native_file_stores_config_and_metadata(tmp_path):
    model = randomised(small(num_classes=3, stem_stride=2, in_chans=1))
    path = save_checkpoint(model, tmp_path / "m.safetensors",
                           metadata={"class_names": json.dumps(["a", "b", "c"]), "img_size": 32})
    meta = read_metadata(path)
    assert json.loads(meta["config"])["stem_stride"] == 2 and meta["img_size"] == "32"
    built = load_model(path)
    assert built.config["in_chans"] == 1 and built.config["num_classes"] == 3
    assert built.class_names == ["a", "b", "c"]
    assert same_weights(model, built)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), built.eval()(x))


@pytest.mark.parametrize("layout", ["official", "timm", "hf"])
def test_load_model_infers_the_architecture(tmp_path, layout):
    model = randomised(small(num_classes=4, depths=(1, 2, 1, 1), stem_stride=2))
    path = save_checkpoint(model, tmp_path / ("hf" if layout == "hf" else f"m.{layout}.pt"),
                           layout=layout)
    config = infer_config(path)
    assert config["depths"] == [1, 2, 1, 1] and config["dims"] == [8, 16, 24, 32]
    assert config["stem_stride"] == 2 and config["num_classes"] == 4 and config["use_grn"]
    built = load_model(path)
    assert same_weights(model, built)
    rehead = load_model(path, num_classes=7)  # another class count: a fresh head
    assert rehead.head.fc.out_features == 7 and same_weights(model, rehead, skip=("head.fc",))


def test_load_model_encoder_only_has_no_classifier():
    source = randomised(small())
    encoder_sd = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    built = load_model(encoder_sd)
    assert built.num_classes == 0
    assert torch.equal(built.head.norm.weight, torch.ones(32))  # initialised, not meta


def test_v1_layer_scale_round_trip(tmp_path):
    model = randomised(small(use_grn=False, layer_scale_init_value=1e-6))
    for layout in ("official", "timm"):
        sd = convert_state_dict(model.state_dict(), dst=layout)
        assert infer_config(sd)["layer_scale_init_value"] == 1e-6
        assert not infer_config(sd)["use_grn"]
        built = load_model(sd)
        assert same_weights(model, built)


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    first = randomised(small(), 1)
    save_checkpoint(first, path)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(randomised(small(), 2), path)
    assert path.read_bytes() == before  # the old file is untouched
    assert os.listdir(tmp_path) == ["m.safetensors"]  # and no temp file left behind


def test_meta_model_loads_by_assignment():
    source = randomised(small())
    with torch.device("meta"):
        target = small()
    load_checkpoint(target, source.state_dict())
    assert not any(p.is_meta for p in target.parameters())
    assert same_weights(source, target)


# ---- create_model: architecture in models/, weights in checkpoint/ ---------------------

def test_create_model_loads_weights_and_the_registry_builds_architecture_only(tmp_path):
    import convnextv2
    from convnextv2.models import registry
    assert convnextv2.create_model is create_model   # the package's front door loads weights
    source = randomised(registry.create_model("convnextv2_atto", num_classes=5, **SMALL))
    save_checkpoint(source, tmp_path / "clf.safetensors")
    loaded = create_model("convnextv2_atto", pretrained=str(tmp_path / "clf.safetensors"),
                          num_classes=5, **SMALL)
    assert same_weights(source, loaded)
    fresh = create_model("convnextv2_atto", num_classes=5, **SMALL)
    assert not same_weights(source, fresh)           # no pretrained=: random init
    backbone = create_model("convnextv2_atto", pretrained=str(tmp_path / "clf.safetensors"),
                            features_only=True, out_indices=(1, 3), num_classes=5, **SMALL)
    x = torch.randn(1, 3, 64, 64)
    maps = backbone(x)
    assert [m.shape[1] for m in maps] == [16, 32]
    with torch.no_grad():
        torch.testing.assert_close(maps[-1], source.eval().forward_features(x))
    with pytest.raises(TypeError, match="convnextv2.create_model"):
        registry.create_model("convnextv2_atto", pretrained=str(tmp_path / "clf.safetensors"))


# ---- moving an encoder between block kinds (the GRN study's conversions) --------------

BLOCKS = {"v2": dict(use_grn=True, layer_scale_init_value=None),
          "v1": dict(use_grn=False, layer_scale_init_value=1e-6),
          "plain": dict(use_grn=False, layer_scale_init_value=None)}
ENCODER = dict(in_chans=1, num_classes=0, depths=(1, 1, 2, 1), dims=TOY_DIMS,
               stem_stride=1)


def _trained_blocks(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every GRN and layer scale non-trivial values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "grn" in name or "layer_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def _features(model, x):
    with torch.no_grad():
        return model.forward_features(x)


def test_v1_encoder_into_grn_model_folds_layer_scale_and_adds_zero_grn(tmp_path):
    from convnextv2.checkpoint import convert_blocks_file
    torch.manual_seed(0)
    v1 = _trained_blocks(ConvNeXtV2(**ENCODER, **BLOCKS["v1"]), 1)
    save_checkpoint(v1, tmp_path / "v1.safetensors")
    report = convert_blocks_file(tmp_path / "v1.safetensors", tmp_path / "to_v2.st",
                                 **BLOCKS["v2"])
    blocks = [n for n, _ in v1.named_modules() if n.count(".") == 3 and "blocks" in n]
    assert len(blocks) == 5
    assert sorted(report["added"]) == sorted([f"{b}.grn.{p}" for b in blocks
                                              for p in ("gamma", "beta")])
    assert [f.split(" ")[0] for f in report["folded"]] == [f"{b}.layer_scale" for b in blocks]
    assert report["dropped"] == []
    v2 = ConvNeXtV2(**ENCODER, **BLOCKS["v2"]).eval()
    load_checkpoint(v2, tmp_path / "to_v2.st", strict=True, drop_head=True)
    for name, p in v2.named_parameters():
        if "grn" in name:
            assert torch.equal(p, torch.zeros_like(p)), name  # fresh GRN = identity
    x = torch.randn(3, 1, 32, 32)
    # folding the layer scale into pwconv2 and adding an identity GRN keeps the function
    torch.testing.assert_close(_features(v2, x), _features(v1, x), rtol=1e-4, atol=1e-5)
    # the stored config names the new block, so the file rebuilds the right network
    rebuilt = load_model(tmp_path / "to_v2.st")
    assert rebuilt.config["use_grn"] and not rebuilt.config["layer_scale_init_value"]
    # any layout reads the same: the timm file of the same encoder converts identically
    save_checkpoint(v1, tmp_path / "v1_timm.safetensors", layout="timm")
    convert_blocks_file(tmp_path / "v1_timm.safetensors", tmp_path / "from_timm.st",
                        **BLOCKS["v2"])
    from_timm = load_model(tmp_path / "from_timm.st")
    assert same_weights(rebuilt, from_timm)


def test_v2_encoder_into_v1_model_drops_grn_only(tmp_path):
    from convnextv2.checkpoint import convert_blocks_file
    torch.manual_seed(0)
    v2 = _trained_blocks(ConvNeXtV2(**ENCODER, **BLOCKS["v2"]), 2)
    save_checkpoint(v2, tmp_path / "v2.safetensors")
    report = convert_blocks_file(tmp_path / "v2.safetensors", tmp_path / "to_v1.st",
                                 **BLOCKS["v1"])
    assert len(report["dropped"]) == 10 and all(".grn." in k for k in report["dropped"])
    assert len(report["added"]) == 5 and all(k.endswith(".layer_scale") for k in report["added"])
    v1 = ConvNeXtV2(**ENCODER, **BLOCKS["v1"]).eval()
    load_checkpoint(v1, tmp_path / "to_v1.st", strict=True, drop_head=True)
    for name, p in v1.named_parameters():
        if name.endswith("layer_scale"):
            assert torch.equal(p, torch.ones_like(p)), name  # identity, not 1e-6
    # the result is exactly the V2 network with its GRNs removed (set to the identity)
    no_grn = _trained_blocks(ConvNeXtV2(**ENCODER, **BLOCKS["v2"]), 2)
    no_grn.load_state_dict(v2.state_dict())
    with torch.no_grad():
        for name, p in no_grn.named_parameters():
            if "grn" in name:
                p.zero_()
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(_features(v1, x), _features(no_grn, x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_features(v1, x), _features(v2, x), atol=1e-3)
    # into the plain block: GRN dropped, nothing added
    plain = convert_blocks_file(tmp_path / "v2.safetensors", tmp_path / "p.st",
                                **BLOCKS["plain"])
    assert len(plain["dropped"]) == 10 and plain["added"] == [] and plain["folded"] == []
    meta = json.loads(read_metadata(tmp_path / "p.st")["config"])
    assert meta["use_grn"] is False and meta["layer_scale_init_value"] is None


# ---- hub ids ---------------------------------------------------------------------------

def test_hub_offline_error_says_what_was_tried(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    calls = []

    def offline(repo_id, filename, **kw):
        calls.append(filename)
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError) as err:
        create_model("convnextv2_atto", pretrained="someone/convnextv2_atto.fcmae")
    text = str(err.value)
    assert "someone/convnextv2_atto.fcmae" in text and "model.safetensors" in text
    assert "offline" in text and "local file" in text
    assert calls == ["model.safetensors"]  # no second slow attempt once the Hub is unreachable


def test_hub_download_success_and_fallback(monkeypatch, tmp_path):
    import huggingface_hub
    shallow = dict(num_classes=0, **SMALL)
    source = randomised(create_model("convnextv2_atto", **shallow))
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save(convert_state_dict(source.state_dict(), dst="timm"), bin_path)
    calls = []

    def fake(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        if filename == "model.safetensors":
            raise _not_in_repo_error()
        return str(bin_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    model = create_model("convnextv2_atto", pretrained="someone/atto-fcmae", **shallow)
    assert calls == [("someone/atto-fcmae", "model.safetensors"),
                     ("someone/atto-fcmae", "pytorch_model.bin")]
    assert same_weights(source, model)


def _not_in_repo_error():
    from huggingface_hub.errors import RemoteEntryNotFoundError

    class NotInRepo(RemoteEntryNotFoundError):  # what the Hub answers for a missing file
        def __init__(self):
            Exception.__init__(self, "404 Client Error: Entry Not Found")
    return NotInRepo()


def test_load_pretrained_rejects_unknown_strings(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a hub id"):
        load_pretrained(small(), str(tmp_path / "missing.safetensors"))


# ---- the convert command ---------------------------------------------------------------

@pytest.mark.parametrize("to", ["native", "timm", "hf", "official"])
def test_convert_cli(tmp_path, capsys, to):
    source = randomised(small())
    fcmae_like = tmp_path / "in.pt"
    sd = convert_state_dict(source.state_dict(), dst="official")
    torch.save({"model": sd, "args": argparse.Namespace(epochs=1)}, fcmae_like)
    out = tmp_path / ("out_hf" if to == "hf" else "out.bin")
    assert cli_main(["convert", str(fcmae_like), str(out), "--to", to]) == 0
    printed = capsys.readouterr().out
    assert "official layout" in printed and f"{to} layout" in printed and str(out) in printed
    back = small()
    assert load_checkpoint(back, out)["layout"] == to
    assert same_weights(source, back)


def test_convert_cli_checks_model_and_reports_errors(tmp_path, capsys):
    path = tmp_path / "in.safetensors"
    save_checkpoint(randomised(small()), path)
    assert cli_main(["convert", str(path), str(tmp_path / "o.safetensors"), "--model", "atto"]) == 2
    assert "mis-shaped" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "none.pt"), str(tmp_path / "o")]) == 2
    assert "none.pt" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["hf", "official"])
def test_class_names_survive_other_layouts(tmp_path, layout):
    model = randomised(small(num_classes=2))
    path = save_checkpoint(model, tmp_path / ("hf" if layout == "hf" else "m.pt"), layout=layout,
                           metadata={"class_names": ["yes", "no"]})
    assert json.loads(read_metadata(path)["class_names"]) == ["yes", "no"]
    assert load_model(path).class_names == ["yes", "no"]


# ---- convert never replaces a file unasked; a trusted pickle converts once --------------------
def test_convert_refuses_an_existing_output_unless_overwrite(tmp_path, capsys):
    src = save_checkpoint(randomised(small()), tmp_path / "a.safetensors")
    other = save_checkpoint(randomised(small(), seed=1), tmp_path / "b.safetensors")
    before = other.read_bytes()
    assert cli_main(["convert", str(src), str(other)]) == 2
    err = capsys.readouterr().err
    assert "b.safetensors exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert other.read_bytes() == before
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert cli_main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["keep.txt"]
    assert cli_main(["convert", str(src), str(other), "--overwrite"]) == 0
    assert same_weights(load_model(other), load_model(src))
    assert cli_main(["convert", str(src), str(src), "--overwrite"]) == 2  # onto its own input
    assert "is the input" in capsys.readouterr().err


class _Pickled:
    """Stands for any class a training script pickled beside its weights."""

    def __init__(self):
        self.note = "epoch 3"


def test_pickle_refusal_names_the_convert_command_that_works(tmp_path, capsys):
    model = randomised(small())
    trusted = tmp_path / "trusted.pt"
    torch.save({"model": model.state_dict(), "extra": _Pickled()}, trusted)
    with pytest.raises(CheckpointError) as info:
        load_model(trusted)
    hint = str(info.value).split("convert it once: ", 1)[1]
    assert hint == f"convnextv2 convert --trust-pickle {trusted} trusted.safetensors"
    argv = hint.split()[1:]  # run exactly what the message says, from the file's folder
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli_main(argv) == 0
    finally:
        os.chdir(cwd)
    assert same_weights(load_model(tmp_path / "trusted.safetensors"), model)
