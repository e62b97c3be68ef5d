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
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


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
    for (name, ps), (_, pd) in zip(sparse.named_parameters(), dense.named_parameters()):
        if pd.grad is None:
            assert ps.grad is None or ps.grad.abs().max() == 0, name
            continue
        err = (ps.grad - pd.grad).norm() / (pd.grad.norm() + 1e-12)
        assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_sparse_fcmae_bf16_autocast_on_cuda():
    torch.manual_seed(0)
    fcmae = FCMAE(convnextv2.create_model("atto", **TINY), decoder_embed_dim=32).cuda()
    imgs = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, pred, mask = fcmae(imgs)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in fcmae.parameters() if p.grad is not None)
