"""The generic training engine: schedule, parameter groups, run state, metrics, accumulation."""
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from convnextv2 import training as T
from convnextv2.models.registry import create_model



# -- schedule ----------------------------------------------------------------------------------
def test_warmup_cosine_values_by_hand():
    kw = dict(base_lr=1.0, total_steps=100, warmup_steps=10, min_lr=0.1)
    assert T.warmup_cosine_lr(0, **kw) == 0.0
    assert T.warmup_cosine_lr(5, **kw) == pytest.approx(0.5)
    assert T.warmup_cosine_lr(10, **kw) == pytest.approx(1.0)
    # halfway through the cosine part: min + (base - min) * (1 + cos(pi/2)) / 2
    assert T.warmup_cosine_lr(55, **kw) == pytest.approx(0.55)
    # a quarter of the way: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert T.warmup_cosine_lr(32.5, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert T.warmup_cosine_lr(100, **kw) == pytest.approx(0.1)
    assert T.warmup_cosine_lr(150, **kw) == pytest.approx(0.1)
    # no warmup: starts at the peak
    assert T.warmup_cosine_lr(0, base_lr=2.0, total_steps=4) == 2.0
    assert T.warmup_cosine_lr(2, base_lr=2.0, total_steps=4) == pytest.approx(1.0)


def test_schedule_sets_lr_per_group_with_lr_scale():
    w1, w2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([dict(params=[w1], lr_scale=0.25), dict(params=[w2])], lr=1.0)
    sched = T.WarmupCosineSchedule(opt, base_lr=4.0, epochs=10, steps_per_epoch=5,
                                   warmup_epochs=2)  # warmup 10 steps, total 50
    assert sched.total_steps == 50 and sched.warmup_steps == 10
    assert sched.step(5) == pytest.approx(2.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 2.0])
    assert sched.step(30) == pytest.approx(2.0)  # middle of the cosine (min_lr 0)


def test_recipe_helpers():
    assert T.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # the recipe: blr * 4096 / 256
    assert T.clip_warmup_epochs(40, 800) == 40
    assert T.clip_warmup_epochs(40, 10) == 2.5
    assert T.effective_batch(64, 4, 2) == 512


# -- parameter groups ---------------------------------------------------------------------------
def test_param_groups_no_decay_on_bias_norm_grn(toy_arch):
    model = create_model("atto", num_classes=5, **toy_arch)
    groups = T.param_groups(model, 0.05)
    decay, plain = groups
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    params = dict(model.named_parameters())
    # independent rule: exactly the conv kernels and linear matrices decay
    expected = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                for n in [f"{n}.weight"]}
    assert set(decay["names"]) == expected
    assert all(params[n].ndim >= 2 for n in decay["names"])
    assert any(".grn.gamma" in n for n in plain["names"])
    assert any(".grn.beta" in n for n in plain["names"])
    assert "stem.norm.weight" in plain["names"] and "head.fc.bias" in plain["names"]
    assert len(decay["params"]) + len(plain["params"]) == len(params)
    # forcing a matrix into the no-decay group, and frozen parameters are left out
    model.stem.conv.weight.requires_grad_(False)
    d2, p2 = T.param_groups(model, 0.05, skip={"head.fc.weight"})
    assert "head.fc.weight" in p2["names"] and "stem.conv.weight" not in d2["names"] + p2["names"]


def test_grn_params_skip_decay_whatever_their_shape():
    assert T.skips_weight_decay("stages.0.blocks.0.grn.gamma", torch.zeros(1, 1, 1, 8))
    assert T.skips_weight_decay("mask_token", torch.zeros(1, 8, 1, 1))
    assert not T.skips_weight_decay("stages.0.blocks.0.pwconv1.weight", torch.zeros(8, 4))


def test_pretraining_weight_decay_groups_follow_the_official_rule(toy_arch):
    """The official pretraining builds its AdamW groups with timm's rule: no decay for biases
    and 1-D tensors only. Applied to the official module's shapes (GRN gamma/beta (1, C) in the
    sparse encoder and (1, 1, 1, C) in the decoder, mask token (1, C, 1, 1)), GRN and the mask
    token are decayed; ``--wd-exempt grn`` exempts them instead."""
    from convnextv2.recipes.pretrain import PretrainConfig, build_fcmae, pretrain_param_groups

    cfg = PretrainConfig(model="atto", stem_stride=1, img_size=32, decoder_dim=16, **toy_arch)
    fcmae = build_fcmae(cfg)
    trainable = {n: p for n, p in fcmae.named_parameters() if p.requires_grad}

    def official_shape(name, p):
        if ".grn." in name:
            return (1, 1, 1, p.numel()) if name.startswith("decoder.") else (1, p.numel())
        return tuple(p.shape)

    exempt = {n for n, p in trainable.items()
              if len(official_shape(n, p)) <= 1 or n.endswith(".bias")}
    groups = {g["weight_decay"]: set(g["names"]) for g in pretrain_param_groups(fcmae, cfg)}
    assert groups == {0.05: set(trainable) - exempt, 0.0: exempt}
    grn = {n for n in trainable if ".grn." in n}
    assert grn and grn | {"mask_token"} <= groups[0.05]
    assert "encoder.stem.norm.weight" in groups[0.0] and "pred.bias" in groups[0.0]
    # the documented alternative exempts GRN and the mask token (the fine-tuning rule)
    cfg.wd_exempt = "grn"
    other = {g["weight_decay"]: set(g["names"]) for g in pretrain_param_groups(fcmae, cfg)}
    assert other[0.0] == exempt | grn | {"mask_token"}


# -- run state ----------------------------------------------------------------------------------
def _state(step, model=None):
    model = model or nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    return T.build_run_state(model=model, optimizer=opt, epoch=0, batches_done=step,
                             global_step=step, args=dict(output=Path("/x"), b=(1, 2)))


def test_keep_last_and_leftover_temp_files_are_ignored(tmp_path):
    for step in (1, 2, 3, 4, 5):
        T.save_run_state(tmp_path, _state(step), keep_last=3)
    assert [p.name for p in T.list_checkpoints(tmp_path)] == [
        "checkpoint-00000003.pt", "checkpoint-00000004.pt", "checkpoint-00000005.pt"]
    # a crash mid-write leaves only a hidden temp file (possibly newer and truncated)
    (tmp_path / ".checkpoint-00000009.pt.abc123.tmp").write_bytes(b"PK\x03\x04 trunc")
    assert T.resolve_resume("auto", tmp_path).name == "checkpoint-00000005.pt"
    state = T.load_run_state(T.resolve_resume("auto", tmp_path))
    assert state["global_step"] == 5 and state["args"] == {"output": "/x", "b": [1, 2]}
    assert T.resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        T.resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = T.save_run_state(tmp_path, _state(1))
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        T.atomic_torch_save({"x": 1}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # temp file removed


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = _state(7)
    path = T.save_run_state(tmp_path, state)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    loaded = torch.load(path, weights_only=True)  # plain types and tensors only
    T.restore_rng_state(loaded["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_load_run_state_rejects_foreign_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read run state"):
        T.load_run_state(tmp_path / "x.pt")
    torch.save({"model": {}}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        T.load_run_state(tmp_path / "y.pt")


# -- metrics ------------------------------------------------------------------------------------
def test_metrics_resume_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with T.MetricsLog(path) as log:
        for step in range(1, 6):
            log.log(dict(step=step, loss=1.0 / step, lr=torch.tensor(0.5)))
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # torn line from a crash
    with T.MetricsLog(path, resume_step=3) as log:
        log.log(dict(step=4, loss=float("nan")))
    records = T.read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["lr"] == 0.5 and records[3]["loss"] == "nan"
    png = T.plot_curves(records, tmp_path / "c.png", keys=("loss",))
    assert png.read_bytes()[:4] == b"\x89PNG"
    T.MetricsLog(path)  # a fresh (non-resumed) run starts an empty file
    assert T.read_metrics(path) == []


# -- data order -------------------------------------------------------------------------------
class _RandomDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(1).item() + np.random.rand() + random.random()


def test_keyed_augmentation_ignores_access_order_and_global_rng():
    ds = T.KeyedAugmentDataset(_RandomDataset(), seed=5)
    first = [ds[i] for i in range(10)]
    torch.manual_seed(123)
    outside = torch.rand(1)
    torch.manual_seed(123)
    again = [ds[i] for i in reversed(range(10))][::-1]
    assert again == first
    assert torch.equal(torch.rand(1), outside)  # the caller's stream is untouched
    ds.set_epoch(1)
    assert [ds[i] for i in range(10)] != first


def test_resumable_sampler_skips_the_done_part_of_the_epoch():
    info = T.DistInfo()
    sampler = T.ResumableSampler(T.build_sampler(range(20), info, seed=3))
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=8)
    assert list(sampler) == full[8:] and len(sampler) == 12
    sampler.set_epoch(3)
    assert len(list(sampler)) == 20 and list(sampler) != full
    # the two ranks of a world of two split the same epoch order
    halves = [list(T.build_sampler(range(20), T.DistInfo(rank=r, world_size=2), seed=3))
              for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(20))


def test_world_of_one_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = T.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert T.all_reduce_mean(torch.tensor(3.0)).item() == 3.0
    assert T.broadcast_object("x") == "x"


# -- accumulation / amp -------------------------------------------------------------------------
def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    ref, acc = nn.Linear(4, 1), nn.Linear(4, 1)
    acc.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_acc = torch.optim.SGD(acc.parameters(), lr=0.1)
    nn.functional.mse_loss(ref(x), y).backward()
    opt_ref.step()
    stepper = T.AccumulatingStep(acc, opt_acc, accum_steps=2)
    stepped = []
    for xb, yb in ((x[:4], y[:4]), (x[4:], y[4:])):
        with stepper.micro_batch():
            loss = nn.functional.mse_loss(acc(xb), yb)
        stepped.append(stepper.backward(loss))
    assert stepped == [False, True]
    for a, b in zip(ref.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in acc.parameters())  # zeroed after the step


def test_bf16_autocast_on_cpu_and_fp16_needs_cuda():
    with T.autocast(torch.device("cpu"), "bf16"):
        out = nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        T.check_amp("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="--amp"):
        T.check_amp("fp8", torch.device("cpu"))
