"""CUDA checks: the same numbers on the GPU as on the CPU. Skipped where there is no GPU (CI)."""
import copy

import pytest
import torch

import convnextv2
from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masking import random_mask

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 matmuls round to 10 bits: fine for training, not for 1e-5 comparisons."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


TINY = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))


def _randomise_affine(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")) or ".norm." in name:
                p.normal_(0.0, 0.5)


def test_dense_model_cuda_matches_cpu():
    torch.manual_seed(0)
    model = convnextv2.create_model("atto", num_classes=10, **TINY).eval()
    _randomise_affine(model)
    x = torch.randn(4, 3, 64, 96)
    ref = model(x)
    out = model.cuda()(x.cuda()).cpu()
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()  # scaled to the logits


@pytest.mark.parametrize("in_chans,stem_stride,size", [(3, 4, (96, 64)), (1, 1, (32, 16))])
def test_sparse_and_dense_backends_agree_on_cuda(in_chans, stem_stride, size):
    torch.manual_seed(0)
    enc = convnextv2.create_model("atto", in_chans=in_chans, stem_stride=stem_stride, **TINY)
    _randomise_affine(enc)
    sparse = FCMAE(enc, decoder_embed_dim=32, backend="sparse").cuda()
    dense = copy.deepcopy(sparse).set_backend("dense")
    imgs = torch.randn(3, in_chans, *size, device="cuda")
    grid = (size[0] // sparse.patch_size, size[1] // sparse.patch_size)
    mask = random_mask(3, grid, 0.6, generator=torch.Generator().manual_seed(1)).cuda()
    loss_s, _, _ = sparse(imgs, mask)
    loss_d, _, _ = dense(imgs, mask)
    loss_s.backward()
    loss_d.backward()
    assert abs(loss_s.item() - loss_d.item()) <= 1e-5 * abs(loss_d.item())
    _assert_same_grads(sparse, dense, 1e-4)


def test_sparse_fcmae_bf16_autocast_on_cuda():
    torch.manual_seed(0)
    fcmae = FCMAE(convnextv2.create_model("atto", **TINY), decoder_embed_dim=32).cuda()
    imgs = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, pred, mask = fcmae(imgs)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in fcmae.parameters() if p.grad is not None)


def _assert_same_grads(model, ref, tol):
    """Every gradient within ``tol`` of the reference's largest magnitude."""
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        err = ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: gradient error {err:.2e} of its largest magnitude"


def _fcmae(backend="sparse", seed=0):
    torch.manual_seed(seed)
    enc = convnextv2.create_model("atto", **TINY)
    _randomise_affine(enc)
    return FCMAE(enc, decoder_embed_dim=32, backend=backend).cuda().train()


@pytest.mark.parametrize("backend", ["sparse", "dense"])
@pytest.mark.parametrize("amp", [False, True])
def test_training_step_never_syncs_with_the_host(backend, amp):
    """No nonzero, no .item(), no host copy: the whole step under sync debug mode "error"
    (masks given on the device, and drawn inside the forward)."""
    model = _fcmae(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    imgs = torch.randn(4, 3, 96, 64, device="cuda")
    mask = random_mask(4, (3, 2), 0.6, generator=torch.Generator().manual_seed(1)).cuda()

    def step(m):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(imgs, m)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step(mask)  # first calls: library handles, cached offsets
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for m in (mask, None, mask):
            loss = step(m)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_a_bad_mask_on_the_device_fails_asynchronously():
    """A device mask must keep int(L * (1 - ratio)) cells; checked by a device assert, which
    surfaces at the next sync. Run in a child process: a device assert ends the CUDA context."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import torch, convnextv2
        from convnextv2.fcmae.fcmae import FCMAE
        m = FCMAE(convnextv2.create_model("atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
                  decoder_embed_dim=16).cuda()
        imgs = torch.randn(2, 3, 64, 64, device="cuda")
        m(imgs, torch.zeros(2, 4, device="cuda"))[0].sum().item()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "assert" in (out.stderr + out.stdout).lower(), out.stderr[-2000:]


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_fullgraph_inductor_compile_matches_eager_on_cuda(backend):
    eager = _fcmae(backend, seed=1)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    imgs = torch.randn(3, 3, 64, 96, device="cuda")
    mask = random_mask(3, (2, 3), 0.6, generator=torch.Generator().manual_seed(2)).cuda()
    loss_e, pred_e, _ = eager(imgs, mask)
    loss_c, pred_c, _ = compiled(imgs, mask)
    loss_e.backward()
    loss_c.backward()
    assert abs(loss_c.item() - loss_e.item()) <= 1e-5 * abs(loss_e.item())
    assert (pred_c - pred_e).abs().max() <= 1e-4 * pred_e.abs().max()
    _assert_same_grads(twin, eager, 1e-4)


def test_reduce_overhead_compile_matches_eager_on_cuda():
    """mode="reduce-overhead": CUDA graphs for forward and backward (cudagraph trees)."""
    eager = _fcmae("sparse", seed=1)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, mode="reduce-overhead")
    imgs = torch.randn(3, 3, 64, 96, device="cuda")
    for seed in range(3):
        mask = random_mask(3, (2, 3), 0.6, generator=torch.Generator().manual_seed(seed)).cuda()
        eager.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        loss_e = eager(imgs, mask)[0]
        loss_c = compiled(imgs, mask)[0]
        loss_e.backward()
        loss_c.backward()
        assert abs(loss_c.item() - loss_e.item()) <= 1e-5 * abs(loss_e.item())
        _assert_same_grads(twin, eager, 1e-4)


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_cuda_graph_train_step_equals_the_eager_steps(backend):
    from convnextv2.fcmae.fast import TrainStep
    eager = _fcmae(backend, seed=2)
    twin = copy.deepcopy(eager)
    step_e = TrainStep(eager, torch.optim.AdamW(eager.parameters(), lr=1e-3, fused=True))
    step_g = TrainStep(twin, torch.optim.AdamW(twin.parameters(), lr=1e-3, fused=True),
                       cuda_graph=True, warmup=2)
    imgs = torch.randn(3, 3, 64, 96, device="cuda")
    masks = [random_mask(3, (2, 3), 0.6, generator=torch.Generator().manual_seed(s)).cuda()
             for s in range(6)]
    for i, mask in enumerate(masks):  # 2 warm-up steps, the captured one, 3 replays
        x = imgs * (1 + 0.1 * i)
        loss_e, loss_g = step_e(x, mask), step_g(x, mask)
        assert abs(loss_g.item() - loss_e.item()) <= 1e-4 * abs(loss_e.item()), i
    assert step_g.graph is not None
    for (name, pe), (_, pg) in zip(eager.named_parameters(), twin.named_parameters()):
        assert (pg - pe).abs().max() <= 1e-4 * max(pe.abs().max().item(), 1e-3), name
