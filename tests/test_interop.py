"""Our checkpoint conversions against independent references: the stored vectors (made with
the official, timm and transformers code), timm's and transformers' own model classes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convnextv2.checkpoint import (convert_state_dict, detect_layout, load_checkpoint,
                                   save_checkpoint)
from convnextv2.models.model import ConvNeXtV2
from convnextv2.models.variants import VARIANTS, model_config

VECTORS = Path(__file__).resolve().parents[1] / ".." / "shared" / "vectors" / "convnextv2_interop_small.pt"
from conftest import TOY as SMALL
LAYOUT_OF = {"official_dense": "official", "official_fcmae_encoder": "official_fcmae",
             "timm": "timm", "hf_transformers": "hf"}



def _vectors_path() -> Path:
    for candidate in (VECTORS, Path("/work/shared/vectors/convnextv2_interop_small.pt")):
        if candidate.exists():
            return candidate
    pytest.skip("shared/vectors/convnextv2_interop_small.pt is not available")


@pytest.fixture(scope="module")
def vectors():
    return torch.load(_vectors_path(), map_location="cpu", weights_only=True)


def _close(got: torch.Tensor, ref: torch.Tensor, k: float = 1e-5) -> None:
    """Two float32 computations of the same network agree to k relative to the reference's
    largest value: rounding errors grow with the activations' magnitude, and oneDNN picks other
    kernels (other summation orders) on other CPUs, so a fixed absolute limit is chance."""
    torch.testing.assert_close(got, ref, rtol=k, atol=k * max(1.0, ref.abs().max().item()))


def _small(num_classes=5, **kw):
    return ConvNeXtV2(num_classes=num_classes, **SMALL, **kw).eval()


def _random_model(num_classes=5, seed=0, **kw) -> ConvNeXtV2:
    """A small model whose every parameter (GRN included) is random and non-trivial."""
    torch.manual_seed(seed)
    model = _small(num_classes, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", ["official_dense", "timm", "hf_transformers"])
def test_vectors_logits_and_pooled_features(vectors, name):
    sd = vectors[name]
    assert detect_layout(sd) == LAYOUT_OF[name]
    model = _small()
    report = load_checkpoint(model, sd)
    assert report["layout"] == LAYOUT_OF[name] and not report["missing"]
    with torch.no_grad():
        feats = model.forward_features(vectors["input"])
        logits = model.forward_head(feats)
        pooled = model.forward_head(feats, pre_logits=True)
    _close(logits, vectors["logits"])
    _close(pooled, vectors["pooled_features"])


def test_vectors_official_fcmae_encoder(vectors):
    """The sparse (MinkowskiEngine) kernel layout converts to the same dense network."""
    sd = vectors["official_fcmae_encoder"]
    assert detect_layout(sd) == "official_fcmae"
    encoder = _small()
    report = load_checkpoint(encoder, sd, drop_head=True)
    assert report["head"] == "absent"
    dense = _small()
    load_checkpoint(dense, vectors["official_dense"])
    # the encoder has no final norm: take it from the dense checkpoint
    encoder.head.norm.load_state_dict(dense.head.norm.state_dict())
    with torch.no_grad():
        feats = encoder.forward_features(vectors["input"])
        _close(feats, dense.forward_features(vectors["input"]))
        pooled = encoder.forward_head(feats, pre_logits=True)
    _close(pooled, vectors["pooled_features"])


def _fill_from_pools(model: torch.nn.Module, pools) -> None:
    """Random, non-zero parameters (GRN too) as views into a few shared random pools: no
    per-parameter random draws, so even the 660M-parameter huge variant is cheap."""
    weights, small, around_one = pools
    sd = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.dim() > 1:
            pool = weights
        elif name.endswith("weight") and "grn" not in name:
            pool = around_one  # LayerNorm scales
        else:
            pool = small       # biases, GRN weight/bias
        start = (i * 104729) % (pool.numel() - p.numel() + 1)
        sd[name] = pool[start:start + p.numel()].view(p.shape)
    model.load_state_dict(sd, assign=True)


@pytest.fixture(scope="module")
def pools():
    g = torch.Generator().manual_seed(0)
    largest = 2816 * 4 * 2816  # huge's pwconv weights
    small = 0.1 * torch.randn(1 << 20, generator=g)
    return 0.02 * torch.randn(largest, generator=g), small, small + 1


@pytest.mark.parametrize("name", list(VARIANTS))
def test_timm_random_weights_all_variants(name, pools):
    """timm's convnextv2_* with random weights -> our conversion -> our model: same logits.
    Both models are built on the meta device so that no memory is initialised twice."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        reference = timm.create_model(name, num_classes=7)
        ours = ConvNeXtV2(**model_config(name, num_classes=7))
    _fill_from_pools(reference, pools)
    sd = reference.state_dict()
    assert detect_layout(sd) == "timm"
    conv_mlp = name in ("convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano")
    assert (sd["stages.0.blocks.0.mlp.fc1.weight"].dim() == 4) == conv_mlp
    report = load_checkpoint(ours, sd)
    assert report["loaded"] == len(sd) and not report["missing"]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.eval()(x)
        got = ours.eval()(x)
    assert expected.abs().max() > 0.1  # a real signal, not a vanishing one
    _close(got, expected)
    # and back: our timm layout is timm's own state dict, shapes included
    back = convert_state_dict(ours.state_dict(), "native", "timm", model_config=ours.config)
    assert set(back) == set(sd)
    assert all(back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("layout", ["timm", "hf", "official"])
def test_round_trip_through_files_is_bit_exact(tmp_path, layout):
    model = _random_model()
    path = tmp_path / ("out_hf" if layout == "hf" else f"out.{'pt' if layout == 'official' else 'safetensors'}")
    save_checkpoint(model, path, layout=layout)
    native_path = tmp_path / "native.safetensors"
    reloaded = _small()
    report = load_checkpoint(reloaded, path)
    assert report["layout"] == layout
    save_checkpoint(reloaded, native_path)
    again = _small()
    load_checkpoint(again, native_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("layout", ["official", "official_fcmae", "timm", "hf"])
def test_convert_state_dict_round_trip(layout):
    sd = _random_model().state_dict()
    foreign = convert_state_dict(sd, "native", layout)
    assert detect_layout(foreign) == layout
    back = convert_state_dict(foreign, dst="native")
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_official_layout_matches_vectors_names_and_shapes(vectors):
    model = _small()
    load_checkpoint(model, vectors["official_dense"])
    for name in ("official_dense", "timm", "hf_transformers"):
        out = convert_state_dict(model.state_dict(), dst=LAYOUT_OF[name])
        ref = vectors[name]
        assert set(out) == set(ref), name
        assert all(torch.equal(out[k], ref[k]) for k in ref), name
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    out = convert_state_dict(encoder, dst="official_fcmae")
    ref = vectors["official_fcmae_encoder"]
    assert set(out) == set(ref)
    assert all(torch.allclose(out[k], ref[k]) and out[k].shape == ref[k].shape for k in ref)


def test_hf_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _random_model(num_classes=3)
    out = save_checkpoint(model, tmp_path / "hf", layout="hf",
                          metadata={"class_names": json.dumps(["cat", "dog", "eel"])})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "convnextv2" and config["id2label"]["2"] == "eel"
    hf = transformers.ConvNextV2ForImageClassification.from_pretrained(out).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        got = model(x)
    _close(got, expected)


def test_transformers_random_model_loads_into_ours():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = transformers.ConvNextV2Config(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1],
                                        num_labels=4, layer_norm_eps=1e-6)
    hf = transformers.ConvNextV2ForImageClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))  # GRN leaves zero-init
    ours = ConvNeXtV2(num_classes=4, depths=(1, 2, 1, 1), dims=SMALL["dims"]).eval()
    report = load_checkpoint(ours, hf.state_dict())
    assert report["layout"] == "hf"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _close(ours(x), hf(pixel_values=x).logits)


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
def test_timm_file_loads_with_timm_pretrained(tmp_path, name):
    """Our timm layout loads through timm's own pretrained-weights path (1x1-conv MLP for
    atto, Linear MLP for tiny)."""
    timm = pytest.importorskip("timm")
    shallow = dict(depths=SMALL["depths"])  # the variant's widths (they decide the MLP form)
    model = ConvNeXtV2(**model_config(name, num_classes=6, **shallow)).eval()
    with torch.no_grad():
        for block in (b for s in model.stages for b in s.blocks):
            block.grn.gamma.normal_(0, 0.5)
            block.grn.beta.normal_(0, 0.1)
    path = save_checkpoint(model, tmp_path / f"{name}.safetensors", layout="timm")
    reference = timm.create_model(name, pretrained=True, num_classes=6, **shallow,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=6))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _close(model(x), reference.eval()(x))
