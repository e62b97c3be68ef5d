"""CUDA checks: the same numbers on the GPU as on the CPU. Skipped where there is no GPU (CI)."""
import copy
import sys
from pathlib import Path

import pytest
import torch

import convnextv2
from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masking import random_mask

from conftest import TOY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # train_step.py

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


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


TRITON = pytest.param("sparse-triton", marks=pytest.mark.skipif(not _has_triton(),
                                                                 reason="Triton is not installed"))


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
@pytest.mark.parametrize("dwconv", ["grid", pytest.param("triton", marks=pytest.mark.skipif(
    not _has_triton(), reason="Triton is not installed"))])
def test_sparse_and_dense_backends_agree_on_cuda(in_chans, stem_stride, size, dwconv):
    torch.manual_seed(0)
    enc = convnextv2.create_model("atto", in_chans=in_chans, stem_stride=stem_stride, **TINY)
    _randomise_affine(enc)
    sparse = FCMAE(enc, decoder_embed_dim=32, backend="sparse", sparse_dwconv=dwconv).cuda()
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
    """``backend``: "sparse", "dense", or "sparse-triton" (the sparse backend with the Triton
    depthwise kernels)."""
    torch.manual_seed(seed)
    enc = convnextv2.create_model("atto", **TINY)
    _randomise_affine(enc)
    dwconv = "triton" if backend == "sparse-triton" else "grid"
    return FCMAE(enc, decoder_embed_dim=32, backend=backend.split("-")[0],
                 sparse_dwconv=dwconv).cuda().train()



@pytest.mark.skipif(not _has_triton(), reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_depthwise_equals_cudnn_on_the_zero_filled_map(dtype):
    """Every stage of a base-width encoder at 224 px (C = 128..1024, several channel and site
    blocks): forward, input, weight and bias gradients against cuDNN in float32."""
    import torch.nn.functional as F
    from convnextv2.fcmae.sparse import SparseLayout, submanifold_dwconv

    n, grid_hw = 4, (7, 7)
    mask = random_mask(n, grid_hw, 0.6, generator=torch.Generator().manual_seed(0)).cuda()
    layout = SparseLayout.from_mask(mask, grid_hw, num_visible=19)
    for stage, c in enumerate((128, 256, 512, 1024)):
        index, (h, w) = layout.flat_index[stage], layout.stage_hw[stage]
        conv = torch.nn.Conv2d(c, c, 7, padding=3, groups=c).cuda()
        x = torch.randn(n, index.numel() // n, c, device="cuda")
        g = torch.randn_like(x)
        xq, wq = x.to(dtype).float(), conv.weight.to(dtype).float()  # the values the kernel sees
        x_ = xq.clone().requires_grad_(True)
        w_, b_ = wq.clone().requires_grad_(True), conv.bias.detach().clone().requires_grad_(True)
        grid = torch.zeros(n * h * w, c, device="cuda").index_put((index,), x_.reshape(-1, c))
        ref = F.conv2d(grid.view(n, h, w, c).permute(0, 3, 1, 2), w_, b_, padding=3, groups=c)
        ref = ref.permute(0, 2, 3, 1).reshape(-1, c)[index].view_as(x)
        refs = [ref, *torch.autograd.grad((ref * g).sum(), [x_, w_, b_])]
        conv = conv.to(dtype)
        x_t = x.to(dtype).requires_grad_(True)
        out = submanifold_dwconv(conv, x_t, index, (h, w), "triton")
        gots = [out, *torch.autograd.grad((out.float() * g).sum(), [x_t, conv.weight, conv.bias])]
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        for what, got, want in zip(("forward", "grad x", "grad w", "grad b"), gots, refs):
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
            assert err <= tol, f"stage {stage} {what}: {err:.2e}"


@pytest.mark.parametrize("backend", ["sparse", TRITON, "dense"])
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
        m = FCMAE(convnextv2.create_model("atto", **TOY),
                  decoder_embed_dim=16).cuda()
        imgs = torch.randn(2, 3, 64, 64, device="cuda")
        m(imgs, torch.zeros(2, 4, device="cuda"))[0].sum().item()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "assert" in (out.stderr + out.stdout).lower(), out.stderr[-2000:]


@pytest.mark.parametrize("backend", ["sparse", TRITON, "dense"])
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


@pytest.mark.parametrize("dwconv", ["grid", pytest.param("triton", marks=pytest.mark.skipif(
    not _has_triton(), reason="Triton is not installed"))])
def test_compiled_sparse_block_keeps_sites_not_grids_on_cuda(dwconv):
    """The compiled block's saved tensors on CUDA, with either depthwise kernel: sites (and the
    Triton neighbour table), never a zero-filled grid of the map."""
    from test_sparse import compiled_block_saved_shapes

    shapes, (n, h, w) = compiled_block_saved_shapes("cuda", dwconv)
    assert shapes
    assert not [s for s in shapes if n * h * w in s or s[-2:] == (h, w)], shapes


@pytest.mark.parametrize("backend", ["sparse", TRITON, "dense"])
def test_cuda_graph_train_step_equals_the_eager_steps(backend):
    from train_step import TrainStep  # benchmarks/ (on sys.path above)
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
