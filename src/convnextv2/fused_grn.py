"""GRN fused into the Linear that follows it: the same numbers as ``grn`` + ``pwconv2``, less memory traffic.

GRN's input is the widest activation of a block (4C channels), and on CPU its cost is memory
traffic, not arithmetic. GRN only rescales each channel of a sample and adds a constant:

    y = x * a_n + beta,   a_n = 1 + gamma * Nx_n   (per sample n, per channel)
    y @ W.T + b = x @ (W * a_n).T + (W @ beta + b)

so GRN followed by ``Linear(4C, C)`` is one batched matrix multiply with a per-sample scaled
weight (a (C, 4C) matrix per sample, tiny next to the activations). The rescaled 4C-wide tensor
is never written, and the hand-written backward needs one extra pass over the activation (for
the gradient through GRN's norm), folded into the batched multiply as its added input.

Both FCMAE backends use it, so it does not bias their speed comparison.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .grn import GRN_EPS


def _sum_of_squares(x: torch.Tensor, sites: tuple[int, ...]) -> torch.Tensor:
    """Per sample and channel, in float32 at least (fp16 overflows). An explicit square-and-sum
    is several times faster on CPU than ``vector_norm``'s reduction over a middle axis."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return (xf * xf).sum(dim=sites, keepdim=True)


class _GRNLinear(torch.autograd.Function):
    """x (N, K, D) -> Linear(GRN(x)) (N, K, C), K = all sites of a sample flattened."""

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, bias):
        gx = _sum_of_squares(x, (1,)).sqrt_()                       # (N, 1, D)
        denom = gx.mean(dim=-1, keepdim=True) + GRN_EPS
        nx = gx / denom
        scale = 1 + gamma.to(nx.dtype) * nx                           # (N, 1, D)
        w_n = (weight.to(nx.dtype) * scale).to(x.dtype)               # (N, C, D)
        b = beta.to(weight.dtype) @ weight.t()
        if bias is not None:
            b = b + bias
        y = torch.baddbmm(b.to(x.dtype), x, w_n.transpose(1, 2))
        ctx.save_for_backward(x, gamma, beta, weight, gx, denom, nx, scale, w_n)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, gamma, beta, weight, gx, denom, nx, scale, w_n = ctx.saved_tensors
        g = g.contiguous()
        acc = nx.dtype
        grad_wn = torch.bmm(g.transpose(1, 2), x).to(acc)             # (N, C, D)
        grad_b = g.sum(dim=(0, 1), dtype=acc)                         # (C,)
        grad_weight = (grad_wn * scale).sum(0) + torch.outer(grad_b, beta.to(acc))
        grad_scale = (grad_wn * weight.to(acc)).sum(dim=1, keepdim=True)   # (N, 1, D)
        grad_beta = grad_b @ weight.to(acc)
        grad_gamma = (grad_scale * nx).sum(dim=(0, 1))
        grad_nx = grad_scale * gamma.to(acc)
        grad_gx = grad_nx / denom - (grad_nx * gx).sum(-1, keepdim=True) / (denom * denom * gx.shape[-1])
        coef = torch.where(gx > 0, grad_gx / gx.clamp_min(1e-30), torch.zeros_like(gx))
        # d/dx of x @ w_n.T, plus the path through the norm: x * dL/dGx / Gx
        grad_x = torch.baddbmm(x * coef.to(x.dtype), g, w_n)
        return (grad_x, grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype),
                grad_weight.to(weight.dtype), grad_b.to(weight.dtype) if ctx.has_bias else None)


class _GRN(torch.autograd.Function):
    """GRN alone, x (N, K, D), with a hand-written backward (about 7 passes instead of ~12)."""

    @staticmethod
    def forward(ctx, x, gamma, beta):
        gx = _sum_of_squares(x, (1,)).sqrt_()
        denom = gx.mean(dim=-1, keepdim=True) + GRN_EPS
        nx = gx / denom
        ctx.save_for_backward(x, gamma, gx, denom, nx)
        return torch.addcmul(beta.to(x.dtype), x, (1 + gamma.to(nx.dtype) * nx).to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        x, gamma, gx, denom, nx = ctx.saved_tensors
        g = g.contiguous()
        acc = nx.dtype
        sum_gx = (g * x).sum(dim=1, keepdim=True, dtype=acc)              # (N, 1, D)
        grad_gamma = (sum_gx * nx).sum(dim=(0, 1))
        grad_beta = g.sum(dim=(0, 1), dtype=acc)
        grad_nx = sum_gx * gamma.to(acc)
        grad_gx = grad_nx / denom - (grad_nx * gx).sum(-1, keepdim=True) / (denom * denom * gx.shape[-1])
        coef = torch.where(gx > 0, grad_gx / gx.clamp_min(1e-30), torch.zeros_like(gx))
        grad_x = torch.addcmul(g * (1 + gamma.to(acc) * nx).to(x.dtype), x, coef.to(x.dtype))
        return grad_x, grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype)


def grn_linear(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(grn(x, gamma, beta), weight, bias)`` for x (N, ..., D), GRN per sample.

    The per-sample weight route pays N copies of the (C, D) weight; it wins where a sample
    has more sites than the layer has outputs (early stages), else GRN runs on its own.
    """
    shape = x.shape
    x3 = x.reshape(shape[0], -1, shape[-1])
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if x3.shape[1] >= 2 * weight.shape[0]:
        if autocast:
            with torch.autocast(device, enabled=False):
                y = _GRNLinear.apply(x3.to(torch.get_autocast_dtype(device)), gamma, beta, weight, bias)
        else:
            y = _GRNLinear.apply(x3, gamma, beta, weight, bias)
    else:
        y = F.linear(_GRN.apply(x3, gamma, beta), weight, bias)
    return y.reshape(*shape[:-1], y.shape[-1])


def block_mlp(block, x: torch.Tensor) -> torch.Tensor:
    """``Block.mlp`` with GRN fused into ``pwconv2``: LN, Linear, GELU, GRN + Linear (, layer scale)."""
    x = block.norm(x)
    x = block.act(block.pwconv1(x))
    if block.grn is not None:
        x = grn_linear(x, block.grn.gamma, block.grn.beta, block.pwconv2.weight, block.pwconv2.bias)
    else:
        x = F.linear(x, block.pwconv2.weight, block.pwconv2.bias)
    if block.layer_scale is not None:
        x = x * block.layer_scale
    return x
