"""The GRN study (studies/grn_study.py): moving encoders between blocks, and the smoke budget
that runs every Table 2(f) arm and the collapse curves end to end (CI)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from convnextv2.checkpoint import load_checkpoint, save_checkpoint
from convnextv2.models.model import ConvNeXtV2

STUDY = Path(__file__).resolve().parents[1] / "studies" / "grn_study.py"
ARCH = dict(in_chans=1, num_classes=0, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), stem_stride=1)


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("grn_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
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


def test_v1_encoder_into_grn_model_folds_layer_scale_and_adds_zero_grn(study, tmp_path):
    torch.manual_seed(0)
    v1 = _randomised(ConvNeXtV2(**ARCH, **study.BLOCKS["v1"]), 1)
    save_checkpoint(v1, tmp_path / "v1.safetensors")
    report = study.convert_encoder(str(tmp_path / "v1.safetensors"), str(tmp_path / "to_v2.st"),
                                   study.BLOCKS["v2"])
    blocks = [n for n, _ in v1.named_modules() if n.count(".") == 3 and "blocks" in n]
    assert len(blocks) == 5
    assert sorted(report["added"]) == sorted([f"{b}.grn.{p}" for b in blocks
                                              for p in ("gamma", "beta")])
    assert [f.split(" ")[0] for f in report["folded"]] == [f"{b}.layer_scale" for b in blocks]
    assert report["dropped"] == []
    v2 = ConvNeXtV2(**ARCH, **study.BLOCKS["v2"]).eval()
    load_checkpoint(v2, tmp_path / "to_v2.st", strict=True, drop_head=True)
    for name, p in v2.named_parameters():
        if "grn" in name:
            assert torch.equal(p, torch.zeros_like(p)), name  # fresh GRN = identity
    x = torch.randn(3, 1, 32, 32)
    # folding the layer scale into pwconv2 and adding an identity GRN keeps the function
    torch.testing.assert_close(_features(v2, x), _features(v1, x), rtol=1e-4, atol=1e-5)


def test_v2_encoder_into_v1_model_drops_grn_only(study, tmp_path):
    torch.manual_seed(0)
    v2 = _randomised(ConvNeXtV2(**ARCH, **study.BLOCKS["v2"]), 2)
    save_checkpoint(v2, tmp_path / "v2.safetensors")
    report = study.convert_encoder(str(tmp_path / "v2.safetensors"), str(tmp_path / "to_v1.st"),
                                   study.BLOCKS["v1"])
    assert len(report["dropped"]) == 10 and all(".grn." in k for k in report["dropped"])
    assert len(report["added"]) == 5 and all(k.endswith(".layer_scale") for k in report["added"])
    v1 = ConvNeXtV2(**ARCH, **study.BLOCKS["v1"]).eval()
    load_checkpoint(v1, tmp_path / "to_v1.st", strict=True, drop_head=True)
    for name, p in v1.named_parameters():
        if name.endswith("layer_scale"):
            assert torch.equal(p, torch.ones_like(p)), name  # identity, not 1e-6
    # the result is exactly the V2 network with its GRNs removed (set to the identity)
    no_grn = _randomised(ConvNeXtV2(**ARCH, **study.BLOCKS["v2"]), 2)
    no_grn.load_state_dict(v2.state_dict())
    with torch.no_grad():
        for name, p in no_grn.named_parameters():
            if "grn" in name:
                p.zero_()
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(_features(v1, x), _features(no_grn, x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_features(v1, x), _features(v2, x), atol=1e-3)
    # into the plain block: GRN dropped, nothing added
    plain = study.convert_encoder(str(tmp_path / "v2.safetensors"), str(tmp_path / "p.st"),
                                  study.BLOCKS["plain"])
    assert len(plain["dropped"]) == 10 and plain["added"] == [] and plain["folded"] == []
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "p.st"), "pt")
                      .metadata()["config"])
    assert meta["use_grn"] is False and meta["layer_scale_init_value"] is None


def test_budgets_are_sized_as_documented(study):
    for name in ("cpu", "gpu"):
        assert study.BUDGETS[name]["seeds"] >= 3
    gpu = study.BUDGETS["gpu"]
    assert gpu["jobs"] > 1 and gpu["deadline_s"] + 25 <= 160  # leaves room for startup
    assert {a for a, *_ in study.ARMS} == {"grn/grn", "grn/none", "none/grn", "none/none",
                                           "scratch V2", "scratch no-GRN"}


def test_smoke_budget_runs_every_arm_end_to_end(study, tmp_path, capsys):
    """The CI check: every arm, two seeds, the collapse curves and the outputs (~30 s)."""
    out = tmp_path / "grn"
    assert study.main(["--budget", "smoke", "--data", "builtin", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "data: built-in Fashion-MNIST subset" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["seeds"] == [0, 1]
    for arm, *_ in study.ARMS:
        cell = results["summary"]["arms"][arm]
        assert len(cell["top1"]) == 2 and cell["std"] is not None, arm
    runs = results["runs"]
    assert all("error" not in r for r in runs.values())
    assert all(".grn." in k for k in runs["grn/none seed 0"]["conversion"]["dropped"])
    assert runs["none/grn seed 1"]["conversion"]["folded"]  # V1 layer scale folded
    assert runs["none/none seed 0"]["conversion"] == dict(dropped=[], added=[], folded=[])
    assert runs["scratch V2 seed 0"]["conversion"] is None
    curves = results["collapse"]["curves"]
    for site in ("block", "expansion"):
        assert set(curves[site]) == {"v1 FCMAE", "v2 FCMAE", "v1 random init", "v2 random init"}
        assert len(curves[site]["v2 FCMAE"]["mean"]) == 4  # one value per block
        assert curves[site]["v1 FCMAE"]["seeds"] == [0, 1]
        assert (out / f"collapse_{site}.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| yes | removed |" in table and "84.6" in table and "± " in table
    assert "IN PROGRESS" not in table
    # a second study never overwrites the first
    assert study.fresh_folder(out) == tmp_path / "grn-2"
