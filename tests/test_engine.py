"""The training engine (``training.loop.Trainer``) on a fake model: a linear regression on 24
fixed samples, so every behaviour is checked in milliseconds and against values computed
independently (positions, checkpoint names, step records, exact resume)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from convnextv2 import training as T
from convnextv2.training.config import RunConfig

N, BATCH = 24, 4  # 6 micro-batches per epoch


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        return self.fc(x)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(N, 1, generator=g)
    return TensorDataset(x, y)


def _trainer(out, *, accum=1, epochs=2, poison_at=None, args=None, **run):
    """A Trainer over the fake data; ``poison_at``: the forward returns NaN at that step."""
    torch.manual_seed(0)
    cfg = RunConfig(output=str(out), accum_steps=accum, progress=False, keep_last=0, **run)
    model = Regression()
    keyed = T.KeyedAugmentDataset(_data(), seed=0)
    sampler = T.ResumableSampler(T.build_sampler(keyed, T.DistInfo(), shuffle=True, seed=0))
    loader = DataLoader(keyed, batch_size=BATCH, sampler=sampler,
                        generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    steps_per_epoch = len(loader) // accum
    schedule = T.WarmupCosineSchedule(optimizer, base_lr=0.1, epochs=epochs,
                                      steps_per_epoch=steps_per_epoch, warmup_epochs=0.5)
    trainer = T.Trainer(model=model, loader=loader, optimizer=optimizer, schedule=schedule,
                        cfg=cfg, info=T.DistInfo(), out=out, args=args or {"lr": 0.1},
                        batches_per_epoch=steps_per_epoch * accum,
                        total_steps=epochs * steps_per_epoch, images_per_step=BATCH * accum)
    out.mkdir(exist_ok=True)

    def forward(m, batch, key):
        x, y = batch
        loss = nn.functional.mse_loss(m(x), y)
        if poison_at is not None and key.step + 1 == poison_at:
            loss = loss * float("nan")
        return loss, len(x)

    return trainer, forward, epochs


def _fit(trainer, epochs, forward, ends=None):
    """A recipe's straight-line main: train each epoch, note its end, save the run state."""
    for epoch in trainer.epochs(epochs):
        if not trainer.train_one_epoch(forward):
            break
        if ends is not None:
            ends.append(epoch)
        trainer.save_state()


def _run(out, **kw):
    trainer, forward, epochs = _trainer(out, **kw)
    trainer.resume()
    ends = []
    with trainer.open_log("steps.jsonl"):
        _fit(trainer, epochs, forward, ends)
    return trainer, ends


def _steps(out):
    records = T.read_metrics(out / "steps.jsonl")
    return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in records]


def _positions(out):
    return [(s["global_step"], s["epoch"], s["batches_done"])
            for s in map(T.load_run_state, T.list_checkpoints(out))]


def test_accumulation_save_every_steps_and_epoch_ends(tmp_path):
    trainer, ends = _run(tmp_path, accum=2, save_every_steps=2)
    # 6 micro-batches / 2 = 3 steps per epoch; every 2 steps inside an epoch, and each end
    assert _positions(tmp_path) == [(2, 0, 4), (3, 1, 0), (4, 1, 2), (6, 2, 0)]
    assert ends == [1, 2] and trainer.pos == T.Position(2, 0, 6)
    records = T.read_metrics(tmp_path / "steps.jsonl")
    assert [(r["step"], r["epoch"]) for r in records] == [(1, 1), (2, 1), (3, 1),
                                                          (4, 2), (5, 2), (6, 2)]
    assert {"loss", "lr", "img_per_s"} <= set(records[0])
    # the lr of each step is the schedule's at the step index: warmup 0.5 epoch = 2 steps
    assert [r["lr"] for r in records][:3] == pytest.approx([0.0, 0.05, 0.1])


def test_accumulated_step_equals_one_large_batch(tmp_path):
    """Two micro-batches of 4 with accumulation give the first update of one batch of 8."""
    trainer, forward, _ = _trainer(tmp_path / "a", accum=2, max_steps=1)
    with trainer.open_log("steps.jsonl"):
        _fit(trainer, 2, forward)
    keyed = trainer.loader.dataset
    keyed.set_epoch(0)
    order = list(iter(trainer.loader.sampler.base))[:8]
    x = torch.stack([keyed[i][0] for i in order])
    y = torch.stack([keyed[i][1] for i in order])
    torch.manual_seed(0)
    ref = Regression()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.0)  # step 0 of the warmup: lr 0
    nn.functional.mse_loss(ref(x), y).backward()
    grads = [p.grad.clone() for p in ref.parameters()]
    opt.step()
    state = T.load_run_state(T.latest_checkpoint(tmp_path / "a"))
    moments = [state["optimizer"]["state"][i]["exp_avg"] for i in range(2)]
    for g, m in zip(grads, moments):  # AdamW's first moment after one step = 0.1 * grad
        torch.testing.assert_close(m, 0.1 * g, rtol=1e-5, atol=1e-7 * g.abs().max().item())


def test_stop_and_resume_mid_epoch_repeats_every_step(tmp_path):
    _run(tmp_path / "whole")
    _run(tmp_path / "cut", max_steps=4)          # stops 4 batches into epoch 2 of 6
    assert _positions(tmp_path / "cut")[-1] == (4, 0, 4)
    _run(tmp_path / "cut", resume="auto", max_steps=9)
    _run(tmp_path / "cut", resume="auto")
    assert _steps(tmp_path / "cut") == _steps(tmp_path / "whole")  # bitwise, each step once
    a = T.load_run_state(T.latest_checkpoint(tmp_path / "whole"))["model"]
    b = T.load_run_state(T.latest_checkpoint(tmp_path / "cut"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_before_the_optimizer_applies_it(tmp_path):
    trainer, forward, _ = _trainer(tmp_path, poison_at=3, save_every_steps=2)
    with pytest.raises(T.NonFiniteLossError, match="optimizer step 3") as err:
        with trainer.open_log("steps.jsonl"):
            _fit(trainer, 2, forward)
    assert err.value.checkpoint.name == "checkpoint-00000002.pt"
    saved = T.load_run_state(err.value.checkpoint)["model"]
    for k, v in trainer.model.state_dict().items():  # step 3 was never applied
        assert torch.equal(v, saved[k])
    assert [r["step"] for r in T.read_metrics(tmp_path / "steps.jsonl")] == [1, 2]


def test_resume_refuses_run_changing_options_and_notes_the_others(tmp_path, capsys):
    _run(tmp_path, max_steps=2, args={"data": "a", "lr": 0.1})
    trainer, _, _ = _trainer(tmp_path, resume="auto", args={"data": "b", "lr": 0.1})
    with pytest.raises(ValueError, match=r"data \(a -> b\)"):
        trainer.resume(must_match=("data",), may_change=("lr",))
    trainer, _, _ = _trainer(tmp_path, resume="auto", args={"data": "a", "lr": 0.2})
    assert trainer.resume(must_match=("data",), may_change=("lr",))
    assert "lr (0.1 -> 0.2)" in capsys.readouterr().out
    assert trainer.pos == T.Position(0, 2, 2)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    _run(tmp_path, max_steps=4, save_every_steps=1)
    newest = T.latest_checkpoint(tmp_path)
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 3])  # truncated, e.g. a full disk
    trainer, _, _ = _trainer(tmp_path, resume="auto")
    assert trainer.resume()
    out = capsys.readouterr().out
    assert "checkpoint-00000004.pt" in out and "trying the older checkpoint-00000003.pt" in out
    assert trainer.resumed_from.name == "checkpoint-00000003.pt"
    assert trainer.pos.global_step == 3
    assert newest.exists() and newest.stat().st_size == len(data) // 3  # nothing deleted


def test_tensorboard_gets_the_step_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path / "run", max_steps=3, log_dir=str(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/img_per_s"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(r["step"], r["loss"]) for r in T.read_metrics(tmp_path / "run" / "steps.jsonl")]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert all(math.isfinite(v) for _, v in logged)


def test_a_forward_may_return_loss_parts_which_are_logged_per_step(tmp_path):
    """A dict forward ({"loss", parts}) trains exactly as the plain loss does; each step's
    record also holds each part, averaged over the step's micro-batches."""
    _run(tmp_path / "plain", accum=2, max_steps=3)
    trainer, forward, epochs = _trainer(tmp_path / "parts", accum=2, max_steps=3)

    def with_parts(m, batch, key):
        loss, n = forward(m, batch, key)
        return {"loss_half": loss / 2, "loss": loss, "micro": float(key.micro)}, n

    with trainer.open_log("steps.jsonl"):
        _fit(trainer, epochs, with_parts)
    plain, parts = (T.read_metrics(tmp_path / d / "steps.jsonl") for d in ("plain", "parts"))
    assert [r["loss"] for r in parts] == [r["loss"] for r in plain]
    for r in parts:
        assert r["loss_half"] == pytest.approx(r["loss"] / 2)
        assert r["micro"] == 0.5  # micro-batches 0 and 1 of each step


def test_the_shared_warmup_steps_option_replaces_the_schedules_warmup(tmp_path):
    trainer, _, _ = _trainer(tmp_path, warmup_steps=3)
    assert trainer.schedule.warmup_steps == 3
    assert [trainer.schedule.lr_at(s) for s in range(4)] == pytest.approx(
        [0.0, 0.1 / 3, 0.2 / 3, 0.1])
    trainer, _, _ = _trainer(tmp_path, warmup_steps=0)  # 0: no warmup at all
    assert trainer.schedule.lr_at(0) == pytest.approx(0.1)
    trainer, _, _ = _trainer(tmp_path, accum=2)  # None: the recipe's (half of 3 steps)
    assert trainer.schedule.warmup_steps == 2


def test_one_training_loop_in_the_package():
    """Only the engine trains: ``training/loop.py`` is the one module that drives the
    optimizer step (``AccumulatingStep``) over batches. The recipes (pretrain, finetune,
    detection and segmentation) hand their loaders to the ``Trainer`` and never call
    ``backward``; the one other place that steps an optimizer (a benchmark's timed step,
    which takes no data loader; the CUDA-graph step lives in ``benchmarks/``)."""
    import ast
    from pathlib import Path

    import convnextv2

    src = Path(convnextv2.__file__).parent
    steppers, backward = set(), set()
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id == "AccumulatingStep":
                steppers.add(rel)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "backward" and not (
                        isinstance(node.func.value, ast.Name) and node.func.value.id == "ctx"):
                backward.add(rel)
    assert steppers == {"training/loop.py"}
    assert backward - {"training/step.py", "training/loop.py"} == {"tools/bench.py"}
    for rel in ("tools/bench.py",):
        assert "DataLoader" not in (src / rel).read_text() and "loader" not in \
            (src / rel).read_text()
    for rel in ("recipes/pretrain.py", "recipes/finetune.py", "transfer/engine.py"):
        text = (src / rel).read_text()
        assert "T.Trainer(" in text and ".backward(" not in text and "next(" not in text
