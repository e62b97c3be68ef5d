"""Gradient checkpointing: the same loss and gradients with and without it (float64, so the
only differences are rounding-order ones, far below the tolerance), for the classifier, the
sparse and masked dense FCMAE steps and a detector step; the recompute really happens (a
block's forward runs again in backward); torch.compile and FSDP2 (one gloo process) work."""
import copy
import os
import socket

import pytest
import torch

from convnextv2.detection import build_detector
from convnextv2.fcmae.masking import random_mask
from convnextv2.models.model import ConvNeXtV2, apply_grad_checkpointing
from convnextv2.transfer import build_backbone

from conftest import TOY_DEEP, TOY_WIDE, make_tiny_fcmae

MODES = ["block", "stage"]
# float64 runs: checkpointing recomputes the same ops, so at most reduction-order rounding
TOL = dict(rtol=1e-9, atol=1e-12)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(plain, ckpt, step):
    """``step(model) -> loss`` on both models from the same RNG state: equal loss and grads."""
    torch.manual_seed(3)
    want = step(plain)
    want.backward()
    torch.manual_seed(3)
    got = step(ckpt)
    got.backward()
    torch.testing.assert_close(got, want, **TOL)
    want_g, got_g = _grads(plain), _grads(ckpt)
    assert want_g.keys() == got_g.keys() and len(want_g) > 10
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], **TOL, msg=name)


def _count_calls(modules):
    """Forward calls of each module in ``modules`` (a list), as a list updated in place."""
    calls = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _pair(model, mode):
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True, mode)
    return model, ckpt


@pytest.mark.parametrize("mode", MODES)
def test_classifier_same_loss_and_gradients_and_recomputes(mode):
    torch.manual_seed(0)
    model = ConvNeXtV2(num_classes=5, drop_path_rate=0.3, **TOY_DEEP).double().train()
    plain, ckpt = _pair(model, mode)
    assert ckpt.grad_checkpointing == mode and plain.grad_checkpointing is None
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    y = torch.tensor([0, 4, 2])
    # stochastic depth draws random numbers: the recompute must replay them
    step = lambda m: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    norms = [b.norm for s in ckpt.stages for b in s.blocks]
    calls = _count_calls(norms)
    _assert_same_step(plain, ckpt, step)
    assert calls == [2] * len(norms)  # forward, then again in backward
    with torch.no_grad():  # nothing to save: no recompute, same output
        calls[:] = [0] * len(norms)
        torch.testing.assert_close(ckpt.eval()(x), plain.eval()(x), **TOL)
        assert calls == [1] * len(norms)


def test_switching_off_and_bad_granularity():
    model = ConvNeXtV2(num_classes=0, **TOY_DEEP)
    model.set_grad_checkpointing()
    assert model.grad_checkpointing == "block"
    model.set_grad_checkpointing(False)
    assert model.grad_checkpointing is None
    with pytest.raises(ValueError, match="block, stage.*'layer'"):
        model.set_grad_checkpointing(True, "layer")


@pytest.mark.parametrize("backend", ["sparse", "dense"])
@pytest.mark.parametrize("mode", MODES)
def test_fcmae_step_same_loss_and_gradients(backend, mode):
    fcmae = make_tiny_fcmae(backend=backend, mask_ratio=0.5).double().train()
    for block in fcmae.encoder.modules():
        if hasattr(block, "drop_path"):
            block.drop_path = torch.nn.Identity()
    plain, ckpt = _pair(fcmae, mode)
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = random_mask(2, fcmae.grid_size(imgs), 0.5, generator=torch.Generator().manual_seed(1))
    norms = [b.norm for s in ckpt.encoder.stages for b in s.blocks]
    calls = _count_calls(norms)
    _assert_same_step(plain, ckpt, lambda m: m(imgs, mask)[0])
    assert calls == [2] * len(norms)


@pytest.mark.parametrize("mode", MODES)
def test_detector_step_same_losses_and_gradients(mode):
    torch.manual_seed(0)
    detector = build_detector(3, build_backbone(None, drop_path_rate=0.2, **TOY_WIDE),
                              masks=True, min_size=64, max_size=64, fpn_channels=16,
                              box_head_dim=32, mask_head_dim=8, box_batch_size_per_image=32,
                              rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50)
    detector.double().train()
    plain = detector
    ckpt = copy.deepcopy(detector)
    assert apply_grad_checkpointing(ckpt, mode) == 1  # found the ConvNeXt backbone
    assert ckpt.backbone.body.body.stages[0].grad_checkpointing == mode
    images = [torch.rand(3, 64, 64, dtype=torch.float64) for _ in range(2)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:30, 10:40] = masks[1, 35:60, 30:50] = 1
    targets = [dict(boxes=torch.tensor([[10., 8, 40, 30], [30, 35, 50, 60]], dtype=torch.float64),
                    labels=torch.tensor([1, 3]), masks=masks) for _ in images]
    norms = [b.norm for s in ckpt.backbone.body.body.stages for b in s.blocks]
    calls = _count_calls(norms)
    _assert_same_step(plain, ckpt, lambda m: sum(m(images, targets).values()))
    assert calls == [2] * len(norms)


def test_compiled_model_same_gradients():
    """torch.compile (aot_eager: dynamo's capture and AOT autograd, what checkpointing could
    break; inductor's code generation is minutes on 2 cores) traces the recompute."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvNeXtV2(num_classes=5, **TOY_DEEP).double().train()
    plain, ckpt = _pair(model, "block")
    compiled = torch.compile(ckpt, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _assert_same_step(plain, ckpt, lambda m: (compiled if m is ckpt else m)(x).square().mean())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("unit", ["root", "stage", "block"])
def test_fsdp2_one_process_same_gradients(unit):
    """FSDP2 on one gloo process: fully_shard on the root only (``training.fsdp.shard``), or on
    each stage / each block and then the root. Checkpointing lives inside ``Stage.forward``
    (no wrapper module), so either order of sharding works: the recompute calls the blocks'
    modules, whose unsharded weights FSDP2 has gathered for the backward."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = ConvNeXtV2(num_classes=5, **TOY_DEEP).train()
        plain = copy.deepcopy(model)
        model.set_grad_checkpointing(True, "stage" if unit == "stage" else "block")
        if unit != "root":
            for stage in model.stages:
                for part in ([stage] if unit == "stage" else list(stage.blocks)):
                    fully_shard(part)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        x = torch.randn(2, 3, 64, 64)
        calls = _count_calls([b.norm for s in model.stages for b in s.blocks])
        for m in (plain, model):
            m(x).square().mean().backward()
        assert calls == [2] * len(calls)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7,
                                       msg=name)
    finally:
        dist.destroy_process_group()


def test_pretrain_command_same_losses_with_grad_checkpointing(tmp_path, make_images, toy_cli,
                                                              monkeypatch):
    """``--grad-checkpointing stage`` through the engine: the units are recomputed, and the
    losses of three optimizer steps equal those of the run without it."""
    from convnextv2.cli import main
    from convnextv2.training import read_metrics

    data = make_images(tmp_path / "data", 8, size=(32, 32))
    base = ["pretrain", *toy_cli, "--data", str(data), "--img-size", "32", "--batch-size", "2",
            "--epochs", "1", "--max-steps", "3", "--workers", "0", "--decoder-dim", "16",
            "--recon-every", "0", "--no-progress"]
    real = torch.utils.checkpoint.checkpoint
    units = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **kw: units.append(fn) or real(fn, *a, **kw))
    assert main([*base, "--output", str(tmp_path / "plain")]) == 0
    assert not units
    assert main([*base, "--output", str(tmp_path / "ckpt"), "--grad-checkpointing", "stage"]) == 0
    assert len(units) == 3 * 4  # three steps, four stages
    losses = [[r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl")]
              for run in ("plain", "ckpt")]
    assert len(losses[0]) == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)


def _live_bytes():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from grad_checkpointing import LiveBytes
    return LiveBytes


def test_benchmark_counter_counts_what_the_forward_keeps():
    """The benchmark's allocator-level counter, against hand-counted bytes and against
    autograd's own list of saved tensors; then what checkpointing changes on the toy model."""
    LiveBytes = _live_bytes()
    x = torch.randn(1000, requires_grad=True)
    with LiveBytes() as counter:
        loss = x.exp().sum()  # exp keeps its 1000-float output; the loss is one float
        assert counter.now == 1000 * 4 + 4
        loss.backward()
    assert counter.now == 4 + 1000 * 4  # the loss and x.grad; exp's output is freed

    torch.manual_seed(0)
    model = ConvNeXtV2(num_classes=5, **TOY_DEEP).train()
    imgs = torch.randn(2, 3, 64, 64)
    saved = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params | {imgs.untyped_storage().data_ptr()}:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    kept = {}
    for mode in (None, "block", "stage"):
        model.set_grad_checkpointing(mode is not None, mode or "block")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), LiveBytes() as counter:
            logits = model(imgs)
            kept[mode] = counter.now - logits.untyped_storage().nbytes()
        if mode is None:  # nothing checkpointed: exactly what autograd saved
            assert kept[None] == sum(saved.values())
    assert kept["block"] < kept[None] / 2 and kept["stage"] < kept["block"]
