"""The pretraining monitor: DINO-style weighted k-NN against a brute-force reference, the
probes of a short FCMAE run (k-NN above the random initialisation, collapse equal to
``analyze collapse`` on the same checkpoint, the overhead in the log), and the same numbers
from two torchrun processes as from one."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TOY_FLAGS

from convnextv2 import training as T
from convnextv2.analysis.knn import knn_hits, knn_predict
from convnextv2.cli import main
from convnextv2.recipes.monitor import stage_means

PRETRAIN = ["pretrain", "--model", "atto", *TOY_FLAGS, "--stem-stride", "1", "--in-chans", "1",
            "--img-size", "32", "--decoder-dim", "16", "--data", "builtin", "--epochs", "1",
            "--batch-size", "64", "--lr", "2e-3", "--warmup-steps", "2", "--no-progress",
            "--workers", "0", "--device", "cpu", "--recon-every", "0",
            "--monitor-data", "builtin", "--monitor-images", "400"]


def _reference_knn(bank, bank_labels, queries, num_classes, k, t):
    """DINO's weighted vote written out one query at a time, in plain Python floats."""
    predictions = []
    for q in queries.tolist():
        sims = []
        for j, b in enumerate(bank.tolist()):
            dot = sum(x * y for x, y in zip(q, b))
            cos = dot / (math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b)))
            sims.append((cos, j))
        votes = [0.0] * num_classes
        for cos, j in sorted(sims, reverse=True)[:k]:
            votes[int(bank_labels[j])] += math.exp(cos / t)
        predictions.append(votes)
    return torch.tensor(predictions, dtype=torch.float64)


def test_knn_matches_a_written_out_weighted_vote():
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 7, generator=gen), torch.randn(9, 7, generator=gen)
    labels = torch.randint(0, 4, (60,), generator=gen)
    scores = knn_predict(bank, labels, queries, 4, k=20, temperature=0.07, chunk=4)
    reference = _reference_knn(bank, labels, queries, 4, 20, 0.07)
    assert torch.allclose(scores, reference, rtol=1e-9, atol=0)
    truth = reference.argmax(dim=1)
    assert knn_hits(scores, truth) == (9, 9)
    assert knn_predict(bank[:3], labels[:3], queries, 4).shape == (9, 4)  # k capped at 3


def test_knn_separates_separable_features():
    """Two tight clusters: every query takes its own cluster's class."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.arange(40) % 2
    bank = centres[labels] + 0.05 * torch.randn(40, 3, generator=gen)
    queries = centres[torch.tensor([0, 1, 1, 0])] + 0.05 * torch.randn(4, 3, generator=gen)
    assert knn_hits(knn_predict(bank, labels, queries, 2), torch.tensor([0, 1, 1, 0]))[0] == 4


def test_stage_means_group_blocks_by_stage():
    names = ["stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.1", "stages.2.blocks.0"]
    assert stage_means(names, [0.1, 0.2, 0.4, 0.5]) == pytest.approx([0.1, 0.3, 0.5])


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A 30-step FCMAE run on the built-in images, probed at the start and the end."""
    out = tmp_path_factory.mktemp("monitor") / "run"
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        assert main([*PRETRAIN, "--max-steps", "30", "--output", str(out),
                     "--log-dir", str(out.parent / "tb")]) == 0
    probes = [r for r in T.read_metrics(out / "metrics.jsonl") if "knn_top1" in r]
    return out, probes, printed.getvalue()


def test_knn_of_a_briefly_pretrained_encoder_beats_its_random_initialisation(watched):
    out, probes, _ = watched
    assert [p["step"] for p in probes] == [0, 30]  # the initialisation, then the end
    start, end = probes
    assert start["knn_queries"] == end["knn_queries"] == 400
    # 400 queries: a standard error of ~2.5 points; pretraining gains ~10 on this data
    assert end["knn_top1"] > start["knn_top1"] + 3, (start["knn_top1"], end["knn_top1"])
    assert (out / "monitor.png").stat().st_size > 0
    steps = [r for r in T.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 30  # the probes do not disturb the step records


def test_logged_collapse_equals_analyze_collapse_on_the_checkpoint(watched, tmp_path):
    out, probes, _ = watched
    assert main(["analyze", "collapse", "--checkpoint", str(out / "encoder.safetensors"),
                 "--data", "builtin", "--split", "val", "--images", "64", "--img-size", "32",
                 "--seed", "0", "--output", str(tmp_path / "c")]) == 0
    model = json.loads((tmp_path / "c" / "collapse.json").read_text())["models"][0]
    expected = stage_means(model["layers"], model["scores"])
    logged = [probes[-1][f"collapse_stage{i + 1}"] for i in range(len(expected))]
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert probes[-1]["collapse_mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)


def test_the_probes_reach_tensorboard(watched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, probes, _ = watched
    events = EventAccumulator(str(out.parent / "tb"))
    events.Reload()
    assert {"monitor/knn_top1", "monitor/collapse_stage4"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("monitor/knn_top1")]
    assert logged == [(p["step"], pytest.approx(p["knn_top1"], rel=1e-6)) for p in probes]
    assert "monitor" in events.Tags()["images"]


def test_each_probe_prints_its_overhead(watched):
    _, probes, printed = watched
    lines = [line for line in printed.splitlines() if line.startswith("monitor (epoch")]
    assert len(lines) == 2 and all("overhead" in line and " s" in line for line in lines)
    assert all(p["monitor_s"] > 0 for p in probes)


def test_two_processes_probe_every_image_once_and_agree_with_one(tmp_path):
    """Under torchrun each process embeds its share; the gathered bank and the summed hits
    give the 1-process numbers (compared at step 0, where DDP has given every process the
    same initial weights)."""
    one, two = tmp_path / "one", tmp_path / "two"
    argv = [*PRETRAIN[1:], "--monitor-images", "96", "--max-steps", "1"]
    assert main(["pretrain", *argv, "--output", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "convnextv2", "pretrain", *argv,
                           "--batch-size", "32", "--output", str(two)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = lambda run: next(r for r in T.read_metrics(run / "metrics.jsonl")  # noqa: E731
                             if "knn_top1" in r)
    a, b = first(one), first(two)
    assert a["knn_queries"] == b["knn_queries"] == 96
    assert a["knn_top1"] == b["knn_top1"] and a["knn_top5"] == b["knn_top5"]
    for key in (k for k in a if k.startswith("collapse_")):
        assert b[key] == pytest.approx(a[key], rel=1e-9), key
