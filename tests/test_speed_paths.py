"""Every fast path of the dense model equals the plain math, written out here from the paper.

The model folds GRN into the second Linear (per-sample weights), fuses Linear+GELU with oneDNN
in CPU inference, adds the skip connection inside the matmul and keeps activations in
channels-last memory. None of that may change numbers beyond float rounding (1e-5), in either
mode, for either memory format, for gradients too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convnextv2 import create_model
from convnextv2.models.grn import GRN_EPS, grn
from convnextv2.models.grn_fused import grn_linear
from convnextv2.models.model import Block

from conftest import TOY, TOY_DEEP

TINY = dict(TOY_DEEP, num_classes=5)


def ref_grn(x, gamma, beta):
    """gamma * (x * Nx) + beta + x with Nx = Gx / (mean_c Gx + 1e-6), Gx = L2 over sites."""
    gx = x.pow(2).sum(dim=tuple(range(1, x.dim() - 1)), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    return gamma * (x * nx) + beta + x


def ref_ln_channels(x, norm):
    """LayerNorm over the channel axis of an NCHW tensor."""
    return F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                        1e-6).permute(0, 3, 1, 2)


def ref_block(b, x):
    y = F.conv2d(x, b.dwconv.weight, b.dwconv.bias, padding=3, groups=x.shape[1])
    y = F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[1],), b.norm.weight, b.norm.bias, 1e-6)
    y = F.gelu(y @ b.pwconv1.weight.t() + b.pwconv1.bias)
    y = ref_grn(y, b.grn.gamma, b.grn.beta)
    y = y @ b.pwconv2.weight.t() + b.pwconv2.bias
    return x + y.permute(0, 3, 1, 2)


def ref_forward(m, x):
    """The whole network with F.conv2d, F.layer_norm and the explicit GRN formula."""
    s = m.stem
    x = ref_ln_channels(F.conv2d(x, s.conv.weight, s.conv.bias, stride=s.conv.stride), s.norm)
    for i, stage in enumerate(m.stages):
        if i > 0:
            d = stage.downsample
            x = F.conv2d(ref_ln_channels(x, d.norm), d.conv.weight, d.conv.bias, stride=2)
        for b in stage.blocks:
            x = ref_block(b, x)
    pooled = F.layer_norm(x.mean((2, 3)), (x.shape[1],), m.head.norm.weight, m.head.norm.bias, 1e-6)
    return pooled @ m.head.fc.weight.t() + m.head.fc.bias


def randomised(model, seed=0):
    """Non-trivial GRN and norm parameters (GRN starts as identity, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "grn" in name or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def grads(out, tensors, seed=1):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * weight).sum(), tensors)


def assert_all_close(got, want, tol=1e-5):
    for g, w in zip(got, want):
        scale = max(w.abs().max().item(), 1.0)
        assert (g - w).abs().max().item() <= tol * scale, (g - w).abs().max().item()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_model_outputs_and_gradients_match_plain_math(channels_last, train):
    torch.manual_seed(0)
    m = randomised(create_model("atto", **TINY)).train(train)
    x = torch.randn(3, 3, 64, 64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = list(m.parameters())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = m(xa), ref_forward(m, xb)
    assert_all_close([out], [ref])
    assert_all_close(grads(out, [xa] + params), grads(ref, [xb] + params))


@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_without_grad_matches_plain_math(channels_last):
    """no_grad takes other kernels (oneDNN Linear+GELU, the unrecorded fold)."""
    m = randomised(create_model("atto", **TINY), seed=3).eval()
    x = torch.randn(2, 3, 96, 64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_all_close([m(x)], [ref_forward(m, x)])
        feats = m.forward_intermediates(x)
    assert [f.shape[1] for f in feats] == [8, 16, 24, 32]


@pytest.mark.parametrize("shape", [(2, 5, 6, 16), (3, 7, 16), (2, 40, 8)])  # maps, site lists
@pytest.mark.parametrize("gelu", [False, True])
def test_grn_linear_with_residual_matches_formula(shape, gelu):
    """Both strategies: per-sample weights (many sites) and scaled activations (few sites)."""
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    c_in, c_out = shape[-1], 12
    gamma, beta = (torch.randn(c_in, generator=g, dtype=torch.float64).requires_grad_()
                   for _ in range(2))
    w = torch.randn(c_out, c_in, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(c_out, generator=g, dtype=torch.float64).requires_grad_()
    res = torch.randn(*shape[:-1], c_out, generator=g, dtype=torch.float64).requires_grad_()
    leaves = [x, gamma, beta, w, b, res]
    out = grn_linear(x, gamma, beta, w, b, residual=res, gelu=gelu, eps=GRN_EPS)
    h = F.gelu(x) if gelu else x
    ref = res + ref_grn(h, gamma, beta) @ w.t() + b
    assert_all_close([out], [ref], tol=1e-10)
    assert_all_close(grads(out, leaves), grads(ref, leaves), tol=1e-10)
    with torch.no_grad():
        assert_all_close([grn_linear(x, gamma, beta, w, b, residual=res, gelu=gelu, eps=GRN_EPS)], [ref],
                         tol=1e-10)


@pytest.mark.parametrize("shape", [(2, 40, 8), (2, 3, 8)])  # both strategies
def test_grn_linear_applies_gelu_when_grad_mode_is_on_but_nothing_requires_grad(shape):
    g = torch.Generator().manual_seed(9)
    x, gamma, beta = (torch.randn(s, generator=g) for s in (shape, shape[-1:], shape[-1:]))
    w, b = torch.randn(12, shape[-1], generator=g), torch.randn(12, generator=g)
    ref = ref_grn(F.gelu(x), gamma, beta) @ w.t() + b
    assert_all_close([grn_linear(x, gamma, beta, w, b, gelu=True, eps=GRN_EPS)], [ref])


def test_grn_linear_names_the_shape_it_needs():
    """No site axis means no GRN norm to fold: callers run the reference formula instead."""
    with pytest.raises(ValueError, match=r"\(N, sites\.\.\., C\)"):
        grn_linear(torch.randn(4, 8), torch.zeros(8), torch.zeros(8), torch.randn(3, 8),
                   eps=GRN_EPS)


def test_frozen_model_in_grad_mode_matches_plain_math():
    """A frozen backbone run with autograd on (nothing requires grad): the same numbers."""
    m = randomised(create_model("atto", **TINY), seed=5).train().requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    assert_all_close([m(x)], [ref_forward(m, x)])


def test_standalone_grn_matches_formula_with_gradients():
    x = torch.randn(2, 4, 3, 6, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(6, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out, ref = grn(x, gamma, beta), ref_grn(x, gamma, beta)
    assert_all_close([out], [ref], tol=1e-12)
    assert_all_close(grads(out, [x, gamma, beta]), grads(ref, [x, gamma, beta]), tol=1e-12)


def test_block_mlp_on_site_lists_and_with_residual():
    """The sparse encoder calls Block.mlp on (N, K, C) lists of visible sites."""
    torch.manual_seed(0)
    blk = randomised(Block(16))
    y = torch.randn(2, 9, 16)
    with torch.no_grad():
        h = F.gelu(F.layer_norm(y, (16,), blk.norm.weight, blk.norm.bias, 1e-6)
                   @ blk.pwconv1.weight.t() + blk.pwconv1.bias)
        want = ref_grn(h, blk.grn.gamma, blk.grn.beta) @ blk.pwconv2.weight.t() + blk.pwconv2.bias
        assert_all_close([blk.mlp(y)], [want])
        assert_all_close([blk.mlp(y, residual=y)], [want + y])


def test_hooked_sublayers_still_fire():
    """Activation analysis hooks pwconv1/act/grn; the fused path must step aside for it."""
    blk = Block(8).eval()
    seen = []
    handle = blk.act.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        blk(torch.randn(1, 8, 6, 6))
    handle.remove()
    assert seen == [(1, 6, 6, 32)]


def _graph_nodes(tensor):
    """Names of every autograd node behind ``tensor``."""
    seen, todo, names = set(), [tensor.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    return names


def test_cpu_training_takes_the_fast_depthwise_backward_unless_something_hooks_the_conv():
    """Training on the CPU: the blocks' depthwise conv runs with the folded weight gradient
    (its numbers are checked above against the plain math); hooks still see the module."""
    from torch.nn.modules.module import register_module_forward_hook

    blk = Block(8).train()
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    assert "_DepthwiseCPUBackward" in _graph_nodes(blk(x))
    with torch.no_grad():  # inference: the module itself
        assert blk(x).grad_fn is None
    seen = []
    handle = blk.dwconv.register_forward_hook(lambda m, i, out: seen.append(out.shape))
    assert "_DepthwiseCPUBackward" not in _graph_nodes(blk(x)) and seen == [(2, 8, 9, 9)]
    handle.remove()
    handle = register_module_forward_hook(
        lambda m, i, out: seen.append(type(m).__name__) if m is blk.dwconv else None)
    try:
        assert "_DepthwiseCPUBackward" not in _graph_nodes(blk(x))
    finally:
        handle.remove()
    assert seen[-1] == "Conv2d"


def test_bf16_autocast_stays_close_and_keeps_grn_statistics_in_float32():
    torch.manual_seed(0)
    m = randomised(create_model("atto", **TINY)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max().item() < 0.05 * max(ref.abs().max().item(), 1.0)


def test_drop_path_training_path_keeps_shapes_and_eval_matches_plain_math():
    torch.manual_seed(0)
    m = randomised(create_model("atto", drop_path_rate=0.5, **TINY))
    x = torch.randn(2, 3, 64, 64)
    m.train()(x).sum().backward()  # stochastic path: runs and is differentiable
    with torch.no_grad():
        assert_all_close([m.eval()(x)], [ref_forward(m, x)])


def _compile_works() -> bool:
    try:
        import torch._dynamo  # noqa: F401
        return torch._dynamo.is_dynamo_supported()
    except Exception:
        return False


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is not available here")
def test_torch_compile_matches_plain_math_forward_and_backward():
    """Graph capture (dynamo + AOT autograd) of the fused paths, custom backward included;
    the "aot_eager" backend skips inductor's C++ code generation, which takes minutes here.
    `convnextv2 bench --compile` exercises the inductor backend."""
    torch.manual_seed(0)
    m = randomised(create_model("atto", num_classes=5, **TOY))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(m, backend="aot_eager")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = compiled(xa), ref_forward(m, xb)
    assert_all_close([out], [ref])
    params = list(m.parameters())
    assert_all_close(grads(out, [xa] + params), grads(ref, [xb] + params))


def test_bench_times_ours_against_timm_with_the_same_weights():
    """`convnextv2 bench --vs-timm` copies our weights into timm's model: same logits."""
    from convnextv2.tools.bench import BenchConfig, run_benchmark, timm_twin

    m = randomised(create_model("atto", **TINY)).eval()
    twin = timm_twin(m, "atto").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_all_close([m(x)], [twin(x)])
    lines = []
    out = run_benchmark(BenchConfig(model="atto", batch=1, img_size=32, vs_timm=True,
                                    repeats=2, warmup=0), log=lines.append)
    assert [r.name for r in out["results"]] == ["ours", "timm"]
    assert all(r.peak_bytes > 0 and len(r.times) == 2 for r in out["results"])
    assert out["flops_per_image"] == pytest.approx(2 * 0.55e9 * (32 / 224) ** 2, rel=0.05)
    assert out["ratios"]["median of per-round ratios"] > 0
    assert any("ours / timm speed" in line for line in lines)


def test_bench_cli_rejects_bad_input_with_a_message(capsys):
    from convnextv2.cli import main

    assert main(["bench", "--model", "atto", "--img-size", "100"]) == 2
    assert "multiple of the total stride 32" in capsys.readouterr().err
    assert main(["bench", "--model", "atto", "--amp", "fp16", "--device", "cpu"]) == 2
    assert "--amp bf16" in capsys.readouterr().err
