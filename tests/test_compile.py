"""torch.compile of the FCMAE training step: fullgraph=True (no graph break, no host sync inside),
for both backends, equal to eager.

Whole-model compilation runs with the "aot_eager" backend here (dynamo + AOT autograd: the
graph capture is what can break; inductor's C++ code generation for the whole tiny model took
69 s (sparse) and 97 s (dense) on this 2-core machine). Inductor itself is proven on the sparse encoder's blocks
(``compile_regions``), and on the whole model when CONVNEXTV2_TEST_INDUCTOR=1.
tests/test_gpu.py compiles the whole model with inductor on CUDA.
"""
import copy
import os
import sys
from pathlib import Path

import pytest
import torch

from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.models.runtime import COMPILED_REGIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compiled_regions import compile_regions, uncompile_regions  # noqa: E402
from train_step import TrainStep  # noqa: E402

from test_sparse import make_pair


def _compile_works() -> bool:
    try:
        import torch._dynamo  # noqa: F401
        return torch._dynamo.is_dynamo_supported()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _compile_works(), reason="torch.compile is not available here")


def tiny_pair(backend: str, seed: int = 0):
    """32 px images, 8 px patches (a 4x4 grid, 6 cells visible at ratio 0.6), toy widths."""
    eager, _ = make_pair(stem_stride=1, decoder_dim=16, seed=seed)
    eager.set_backend(backend).train()
    return eager, copy.deepcopy(eager)


def assert_same_step(eager: FCMAE, compiled, imgs, mask, tol=1e-5):
    loss_e, pred_e, _ = eager(imgs, mask)
    loss_c, pred_c, _ = compiled(imgs, mask)
    loss_e.backward()
    loss_c.backward()
    assert abs(loss_c.item() - loss_e.item()) <= tol * abs(loss_e.item())
    assert (pred_c - pred_e).abs().max() <= tol * pred_e.abs().max()
    model_c = getattr(compiled, "_orig_mod", compiled)
    for (name, pe), (_, pc) in zip(eager.named_parameters(), model_c.named_parameters()):
        if pe.grad is None:
            assert pc.grad is None, name
            continue
        assert (pc.grad - pe.grad).abs().max() <= tol * pe.grad.abs().max(), name


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_fullgraph_compiled_training_step_matches_eager(backend):
    eager, twin = tiny_pair(backend)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    imgs = torch.randn(2, 3, 32, 32)
    mask = eager.random_mask(imgs, generator=torch.Generator().manual_seed(1))
    assert_same_step(eager, compiled, imgs, mask)
    # a second batch with another mask reuses the graph (same shapes) and still matches
    eager.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    mask2 = eager.random_mask(imgs, generator=torch.Generator().manual_seed(2))
    assert_same_step(eager, compiled, imgs * 2, mask2)


def test_fullgraph_compiled_step_with_optimizer_and_drawn_masks():
    """The compiled model in a TrainStep: the mask drawn inside the forward, AdamW after it."""
    _, twin = tiny_pair("sparse", seed=1)
    step = TrainStep(torch.compile(twin, fullgraph=True, backend="aot_eager"),
                     torch.optim.AdamW(twin.parameters(), lr=1e-3, fused=True))
    imgs = torch.randn(2, 3, 32, 32)
    before = twin.decoder[0].grn.gamma.detach().clone()
    losses = [step(imgs).item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(twin.decoder[0].grn.gamma, before)


def test_inductor_compiled_sparse_blocks_match_eager():
    """Per-block regional compilation of the sparse encoder with inductor (C++ kernels on the
    CPU; the decoder region is left out to keep this test near half a minute); loss and
    gradients as eager."""
    eager, twin = tiny_pair("sparse", seed=2)
    compile_regions(twin, regions=("sparse_block",))
    imgs = torch.randn(2, 3, 32, 32)
    mask = eager.random_mask(imgs, generator=torch.Generator().manual_seed(3))
    assert_same_step(eager, twin, imgs, mask)
    uncompile_regions(twin)
    assert COMPILED_REGIONS not in twin.__dict__ and COMPILED_REGIONS not in twin.encoder.__dict__


@pytest.mark.skipif(os.environ.get("CONVNEXTV2_TEST_INDUCTOR") != "1",
                    reason="whole-model inductor compile takes minutes on 2 cores; set "
                           "CONVNEXTV2_TEST_INDUCTOR=1")
@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_inductor_whole_model_matches_eager(backend):
    eager, twin = tiny_pair(backend, seed=3)
    compiled = torch.compile(twin, fullgraph=True)
    imgs = torch.randn(2, 3, 32, 32)
    mask = eager.random_mask(imgs, generator=torch.Generator().manual_seed(4))
    assert_same_step(eager, compiled, imgs, mask)


def test_train_step_is_the_plain_step_on_the_cpu():
    eager, twin = tiny_pair("sparse", seed=4)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, fused=True)
    step = TrainStep(twin, torch.optim.AdamW(twin.parameters(), lr=1e-3, fused=True),
                     cuda_graph=True)  # no CUDA here: the plain step
    imgs = torch.randn(2, 3, 32, 32)
    for seed in range(3):
        mask = eager.random_mask(imgs, generator=torch.Generator().manual_seed(seed))
        opt_e.zero_grad(set_to_none=True)
        loss_e = eager(imgs, mask)[0]
        loss_e.backward()
        opt_e.step()
        loss_t = step(imgs, mask)
        assert abs(loss_t.item() - loss_e.item()) <= 1e-6 * abs(loss_e.item())
    for pe, pt in zip(eager.parameters(), twin.parameters()):
        assert (pe - pt).abs().max() <= 1e-6 * max(pe.abs().max().item(), 1e-3)
    with pytest.raises(ValueError, match="amp"):
        TrainStep(twin, opt_e, amp="fp16")
