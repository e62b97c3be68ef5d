"""Checks of the Triton depthwise kernels, run by ``test_triton_dwconv.py`` in a subprocess
with ``TRITON_INTERPRET=1`` (Triton decides at import whether its kernels are interpreted, so
this cannot run in the pytest process). Exits non-zero with a message on the first mismatch."""
import copy
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from convnextv2.fcmae import triton_dwconv  # noqa: E402
from convnextv2.fcmae.fcmae import FCMAE  # noqa: E402
from convnextv2.fcmae.masking import random_mask  # noqa: E402
from convnextv2.fcmae.sparse import SparseLayout, submanifold_dwconv  # noqa: E402
from convnextv2.models.registry import create_model  # noqa: E402


def close(name, got, ref, tol):
    got, ref = got.detach(), ref.detach()
    err = float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))
    if not err <= tol:
        sys.exit(f"{name}: relative error {err:.3g} > {tol:g}")
    print(f"ok {name}: {err:.2g}")


def reference(x, weight, bias, flat_index, n, h, w):
    """Dense depthwise conv of the zero-filled map, read at the sites (plain autograd)."""
    c = x.shape[-1]
    grid = torch.zeros(n * h * w, c, dtype=x.dtype).index_put((flat_index,), x.reshape(-1, c))
    out = F.conv2d(grid.view(n, h, w, c).permute(0, 3, 1, 2), weight, bias,
                   padding=weight.shape[-1] // 2, groups=c)
    return out.permute(0, 2, 3, 1).reshape(-1, c)[flat_index].view_as(x)


def check_kernels():
    """Every stage of a rectangular 3x5 grid, channels not a multiple of the block (12, 70:
    two channel blocks), sites not a multiple of the site block, with and without bias,
    7x7 and 3x3 kernels: forward, input, weight and bias gradients in float64."""
    assert triton_dwconv.supported(torch.zeros(1)), "the interpreter should run CPU tensors"
    gen = torch.Generator().manual_seed(0)
    n, grid_hw = 3, (3, 5)
    layout = SparseLayout.from_mask(random_mask(n, grid_hw, 0.6, generator=gen), grid_hw)
    for stage, (c, ks, bias) in enumerate([(12, 7, True), (70, 7, False), (12, 3, True), (5, 7, True)]):
        flat_index, (h, w) = layout.flat_index[stage], layout.stage_hw[stage]
        conv = torch.nn.Conv2d(c, c, ks, padding=ks // 2, groups=c, bias=bias).double()
        x = torch.randn(n, flat_index.numel() // n, c, dtype=torch.float64, generator=gen)
        g = torch.randn(x.shape, dtype=torch.float64, generator=gen)
        results = []
        for fn in (lambda x_: submanifold_dwconv(conv, x_, flat_index, (h, w), "triton"),
                   lambda x_: reference(x_, conv.weight, conv.bias, flat_index, n, h, w)):
            x_ = x.clone().requires_grad_(True)
            y = fn(x_)
            params = [x_, conv.weight] + ([conv.bias] if bias else [])
            results.append([y, *torch.autograd.grad((y * g).sum(), params)])
        for what, got, ref in zip(("forward", "grad x", "grad weight", "grad bias"), *results):
            close(f"stage {stage} C={c} k={ks} {what}", got, ref, 1e-12)


def check_bf16():
    """bf16 sites and weights: float32 accumulation, so within bf16 rounding of the float32
    result computed from the same bf16 values."""
    gen = torch.Generator().manual_seed(1)
    n, grid_hw = 2, (2, 2)
    layout = SparseLayout.from_mask(random_mask(n, grid_hw, 0.5, generator=gen), grid_hw)
    flat_index, (h, w) = layout.flat_index[0], layout.stage_hw[0]
    c = 16
    conv = torch.nn.Conv2d(c, c, 7, padding=3, groups=c).bfloat16()
    x = torch.randn(n, flat_index.numel() // n, c, generator=gen).bfloat16()
    got = submanifold_dwconv(conv, x, flat_index, (h, w), "triton")
    assert got.dtype == torch.bfloat16
    ref = reference(x.float(), conv.weight.float(), conv.bias.float(), flat_index, n, h, w)
    close("bf16 forward", got, ref, 2 ** -7)


def check_fcmae():
    """A whole FCMAE training step with the Triton depthwise equals the masked dense
    convolution (the reference semantics): loss and every gradient, float64."""
    torch.manual_seed(0)
    encoder = create_model("atto", num_classes=0, stem_stride=1, depths=(1, 2, 1, 1),
                           dims=(8, 16, 24, 72))
    models = {b: FCMAE(copy.deepcopy(encoder), decoder_embed_dim=16, backend=b).double()
              for b in ("sparse", "dense")}
    models["sparse"].set_backend("sparse", "triton")
    models["dense"].load_state_dict(models["sparse"].state_dict())
    imgs = torch.randn(2, 3, 32, 24, dtype=torch.float64)
    mask = random_mask(2, (4, 3), 0.6, generator=torch.Generator().manual_seed(3))
    out = {}
    for b, m in models.items():
        m.train()
        loss = m(imgs, mask)[0]
        loss.backward()
        out[b] = [loss] + [p.grad for p in m.parameters() if p.grad is not None]
    assert len(out["sparse"]) == len(out["dense"]) > 10
    assert out["sparse"][1] is not out["dense"][1]
    for i, (got, ref) in enumerate(zip(out["sparse"], out["dense"])):
        close(f"fcmae {'loss' if i == 0 else f'grad {i}'}", got, ref, 1e-9)


if __name__ == "__main__":
    for check in (check_kernels, check_bf16, check_fcmae):
        t0 = time.perf_counter()
        check()
        print(f"{check.__name__}: {time.perf_counter() - t0:.1f} s")
    print("all interpreted checks passed")
