"""The GRN study (studies/grn_study.py): its budgets, and the smoke budget that runs every
Table 2(f) arm and the collapse curves end to end (CI). Moving encoders between blocks is
``convnextv2.checkpoint.convert_blocks``, tested in test_checkpoint.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from convnextv2.demos.runner import GRACE_S

STUDY = Path(__file__).resolve().parents[1] / "studies" / "grn_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("grn_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budgets_are_sized_as_documented(study):
    for name in ("cpu", "gpu"):
        assert study.BUDGETS[name]["seeds"] >= 3
    gpu = study.BUDGETS["gpu"]
    # the runner kills what still runs GRACE_S after the deadline; room is left for startup
    assert gpu["jobs"] > 1 and gpu["deadline_s"] + GRACE_S <= 160
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
    assert study.fresh_output(out) == tmp_path / "grn-2"
