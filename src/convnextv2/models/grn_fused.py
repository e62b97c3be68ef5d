"""GRN fused with what surrounds it: the numbers of ``grn.grn_reference``, in less memory and time.

Why this module exists. GRN is a per-(sample, channel) scale ``s = 1 + gamma * Nx`` plus a
shift ``beta``, so in front of a Linear layer it folds into that layer: ``Linear(x * s + beta)
= x @ (W * s).T + (W @ beta + b)``, one batched matmul with a per-sample weight. ``grn_linear``
does exactly that, with a hand-written backward, so neither the GRN output nor its gradient is
ever materialised (autograd's generic backward of the broadcasting multiply and the norm made
the training step twice as slow as the matmuls themselves). Where a sample has few sites and
the layer is wide (late stages, the sparse encoder), scaling the activations is cheaper than
per-sample weights; that strategy is one autograd node too, which keeps only the
pre-activation and recomputes GELU's and GRN's outputs in backward (a third less memory kept
per image for base, at no measurable cost in step time). ``fused_grn`` (GRN alone) has its own
fused backward for the same reason, and ``grn_rows`` evaluates GRN's output at some sites only
(the FCMAE decoder at masked cells).

Equal to ``grn_reference`` up to float rounding, gradients included (tests/test_speed_paths.py,
tests/test_sparse.py). These are eager and torch.compile paths: while exporting or tracing
(``runtime.plain_math``) the callers run ``grn_reference`` itself. ``eps`` is GRN's (``GRN.eps``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import accumulation_dtype, autocast_dtype, autocast_off, compiling


def _norm_stats(x3: torch.Tensor, eps: float):
    """(Gx, mean_c Gx + eps, Nx) in float32 for a (N, K, C) tensor; each (N, 1, C) or (N, 1, 1)."""
    if x3.device.type == "cpu" and x3.dtype == torch.float32 and not compiling():
        # on the CPU, vector_norm over the middle axis is 1.5-20x slower than squaring and
        # summing (measured on (32, K, C) site lists, the temporary included); and x * x is
        # 2.3x faster than x.square() (pow's kernel; same numbers)
        gx = (x3 * x3).sum(dim=1, keepdim=True).sqrt_()
    else:
        gx = torch.linalg.vector_norm(x3, ord=2, dim=1, keepdim=True, dtype=accumulation_dtype(x3))
    denom = gx.mean(dim=-1, keepdim=True) + eps
    return gx, denom, gx / denom


def _norm_backward(grad_nx: torch.Tensor, gx: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """dL/dx = x * t given dL/dNx (N, 1, C): returns t (N, 1, C), float32.

    Nx_c = Gx_c / (mean(Gx) + eps) and dGx_c/dx = x / Gx_c (taken as 0 where Gx_c = 0).
    """
    num_ch = gx.shape[-1]
    grad_gx = grad_nx / denom - (grad_nx * gx).sum(-1, keepdim=True) / (denom * denom * num_ch)
    return torch.where(gx > 0, grad_gx / gx.clamp_min(1e-30), torch.zeros_like(gx))


class _GRNFunction(torch.autograd.Function):
    """out = x * (1 + gamma * Nx) + beta on a (N, K, C) tensor, with a fused backward."""

    @staticmethod
    def forward(ctx, x3, gamma, beta, eps):
        gx, denom, nx = _norm_stats(x3, eps)
        scale = torch.addcmul(torch.ones_like(nx), gamma.to(nx.dtype), nx)
        ctx.save_for_backward(x3, gamma, gx, denom, nx, scale)
        return torch.addcmul(beta.to(x3.dtype), x3, scale.to(x3.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x3, gamma, gx, denom, nx, scale = ctx.saved_tensors
        return (*_grn_backward(grad_out, x3, gamma, gx, denom, nx, scale), None)


def _grn_backward(grad_out, x3, gamma, gx, denom, nx, scale, out=None):
    """(grad_x, grad_gamma, grad_beta) of ``x3 * scale + beta``, scale = 1 + gamma * Nx(x3).
    ``out``: a buffer holding ``grad_out`` that may be overwritten with grad_x."""
    # sum over sites of grad * x, per (sample, channel): feeds gamma's and Nx's gradients
    acc = gx.dtype
    gx_dot = (grad_out * x3).sum(dim=1, keepdim=True, dtype=acc)
    grad_gamma = (gx_dot * nx).sum(dim=(0, 1)).to(gamma.dtype)
    grad_beta = grad_out.sum(dim=(0, 1), dtype=acc).to(gamma.dtype)
    t = _norm_backward(gx_dot * gamma.to(acc), gx, denom)
    scale = scale.to(grad_out.dtype)
    grad_x = grad_out * scale if out is None else out.mul_(scale)
    grad_x.addcmul_(x3, t.to(x3.dtype))
    return grad_x, grad_gamma, grad_beta


def fused_grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """``grn_reference(x, gamma, beta, eps)`` on x (N, ..., C) with at least one site axis, with
    a fused backward (autograd's generic one keeps the norm's intermediates and runs several
    broadcasting passes)."""
    shape = x.shape
    out = _GRNFunction.apply(x.reshape(shape[0], -1, shape[-1]), gamma, beta, eps)
    return out.view(shape)


def _bias_through(w: torch.Tensor, beta: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W @ beta + b as a multiply and a sum: unlike gemv, the result does not depend on the
    weights' memory alignment (weights loaded from safetensors are often unaligned), so two
    copies of a model give bitwise equal outputs."""
    return (w * beta).sum(-1) + b


def _fold_scale_bias(gamma, beta, weight, bias, nx, dtype):
    """GRN's scale 1 + gamma * Nx (N, 1, C_in) and the bias W @ beta + b (C_out,) it leaves."""
    acc = nx.dtype
    scale = torch.addcmul(torch.ones_like(nx), gamma.to(acc), nx).to(dtype)
    w32 = weight.to(acc)
    b32 = bias.to(acc) if bias is not None else w32.new_zeros(w32.shape[0])
    return scale, _bias_through(w32, beta.to(acc), b32).to(dtype)


def _fold(gamma, beta, weight, bias, nx, dtype):
    """Per-sample weight W * (1 + gamma * Nx) (N, C_out, C_in) and bias W @ beta + b (C_out,)."""
    acc = nx.dtype
    w32 = weight.to(acc)
    scale = torch.addcmul(torch.ones_like(nx), gamma.to(acc), nx)  # (N, 1, C_in)
    w_n = (w32.unsqueeze(0) * scale).to(dtype)
    b32 = bias.to(acc) if bias is not None else w32.new_zeros(w32.shape[0])
    b_eff = _bias_through(w32, beta.to(acc), b32).to(dtype)
    return scale, w_n, b_eff


def _grn_linear_forward(x3, gamma, beta, weight, bias, residual, eps):
    gx, denom, nx = _norm_stats(x3, eps)
    scale, w_n, b_eff = _fold(gamma, beta, weight, bias, nx, x3.dtype)
    if residual is None:
        out = torch.baddbmm(b_eff.view(1, 1, -1), x3, w_n.transpose(1, 2))
    else:  # add the bias in place: no temporary the size of the residual
        out = torch.baddbmm(residual, x3, w_n.transpose(1, 2)).add_(b_eff)
    return out, (gx, denom, nx, scale, w_n)


class _GRNLinearFunction(torch.autograd.Function):
    """Linear(GRN(x)) (+ residual) on a (N, K, C_in) tensor as one batched matmul.

    With ``gelu=True`` the input is the pre-activation and GELU is applied first; its backward
    then runs in place on the gradient buffer (one large allocation fewer per block). GELU's
    output is kept for backward: this strategy runs where a sample has many sites (the large
    early maps), where recomputing the exact GELU costs 3-4% of a CPU training step.
    """

    @staticmethod
    def forward(ctx, x3, gamma, beta, weight, bias, residual, gelu, eps):
        h = F.gelu(x3) if gelu else x3
        out, (gx, denom, nx, scale, _) = _grn_linear_forward(
            h, gamma, beta, weight, bias, residual, eps)
        ctx.has_bias, ctx.has_residual, ctx.gelu = bias is not None, residual is not None, gelu
        # not the per-sample weights: a (C_out, C_in) matrix per sample, whatever the number
        # of sites (kept, they were 5% of what the sparse encoder keeps per image for base, a
        # share that does not shrink with the mask); one multiply rebuilds them, bit for bit
        ctx.save_for_backward(x3, h if gelu else None, gamma, beta, weight, gx, denom, nx, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x3, h, gamma, beta, weight, gx, denom, nx, scale = ctx.saved_tensors
        h = x3 if h is None else h
        acc = gx.dtype
        w32 = weight.to(acc)
        w_n = (w32.unsqueeze(0) * scale).to(h.dtype)                  # as _fold made them
        g = grad_out.to(h.dtype)
        grad_h = torch.bmm(g, w_n)                                    # (N, K, C_in)
        del w_n
        grad_wn = torch.bmm(g.transpose(1, 2), h).to(acc)             # (N, C_out, C_in)
        grad_b = grad_out.sum(dim=(0, 1), dtype=acc)                  # (C_out,)
        grad_weight = (grad_wn * scale).sum(0) + torch.outer(grad_b, beta.to(acc))
        grad_beta = w32.t() @ grad_b
        grad_scale = (grad_wn * w32).sum(dim=1, keepdim=True)         # (N, 1, C_in)
        grad_gamma = (grad_scale * nx).sum(dim=(0, 1))
        t = _norm_backward(grad_scale * gamma.to(acc), gx, denom)
        grad_h.addcmul_(h, t.to(grad_h.dtype))
        if ctx.gelu:
            torch.ops.aten.gelu_backward.grad_input(grad_h, x3, grad_input=grad_h)
        return (grad_h, grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype),
                grad_weight.to(weight.dtype), grad_b.to(weight.dtype) if ctx.has_bias else None,
                grad_out if ctx.has_residual else None, None, None)


class _GRNThenLinearFunction(torch.autograd.Function):
    """Linear(GRN(act(x))) (+ residual) on a (N, K, C_in) tensor with the activations scaled
    (few sites per sample, wide layers: cheaper than per-sample weights).

    Keeps only the pre-activation and GRN's per-(sample, channel) statistics for backward;
    GELU's output and GRN's output are recomputed there (two elementwise passes) instead of
    being kept: autograd's generic nodes kept three 4C-wide tensors per block, this keeps one.
    """

    @staticmethod
    def forward(ctx, x3, gamma, beta, weight, bias, residual, gelu, eps):
        h = F.gelu(x3) if gelu else x3
        gx, denom, nx = _norm_stats(h, eps)
        scale = torch.addcmul(torch.ones_like(nx), gamma.to(nx.dtype), nx)
        dtype = h.dtype
        out = F.linear(torch.addcmul(beta.to(dtype), h, scale.to(dtype)), weight.to(dtype),
                       None if bias is None else bias.to(dtype))
        if residual is not None:
            out = out + residual
        ctx.has_bias, ctx.has_residual, ctx.gelu = bias is not None, residual is not None, gelu
        ctx.save_for_backward(x3, gamma, beta, weight, gx, denom, nx, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x3, gamma, beta, weight, gx, denom, nx, scale = ctx.saved_tensors
        h = F.gelu(x3) if ctx.gelu else x3
        dtype, acc = h.dtype, gx.dtype
        y = torch.addcmul(beta.to(dtype), h, scale.to(dtype))        # GRN's output, again
        g = grad_out.to(dtype)
        grad_y = g @ weight.to(dtype)                                  # (N, K, C_in)
        grad_weight = (g.reshape(-1, g.shape[-1]).t() @ y.reshape(-1, y.shape[-1]))
        grad_bias = g.sum(dim=(0, 1), dtype=acc) if ctx.has_bias else None
        grad_h, grad_gamma, grad_beta = _grn_backward(grad_y, h, gamma, gx, denom, nx, scale,
                                                      out=grad_y)
        if ctx.gelu:
            torch.ops.aten.gelu_backward.grad_input(grad_h, x3, grad_input=grad_h)
        return (grad_h, grad_gamma, grad_beta, grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(weight.dtype),
                grad_out if ctx.has_residual else None, None, None)


def grn_linear(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               gelu: bool = False, *, eps: float) -> torch.Tensor:
    """``F.linear(grn_reference(x, gamma, beta, eps), weight, bias) (+ residual)`` without
    materialising GRN's output.

    ``x`` is channels-last (N, ..., C_in) with at least one site axis; ``residual``, if given,
    has the output's shape (N, ..., C_out) and is added in the same matmul (the block's skip
    connection); ``gelu=True`` applies exact GELU to ``x`` first. Equal to the unfused formula
    up to float rounding; under autocast the matmul runs in the autocast dtype while the norm
    statistics stay float32.
    """
    if x.dim() < 3:
        raise ValueError(f"grn_linear needs (N, sites..., C) input, got shape {tuple(x.shape)}")
    dtype = autocast_dtype(x)
    shape = x.shape
    res3 = None
    if residual is not None and residual.dtype == dtype:
        res3 = residual.reshape(shape[0], -1, weight.shape[0])
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gamma, beta, weight, bias, res3))
    if gelu and not grad:  # nothing to record: GELU first, then the strategies without a node
        x, gelu = F.gelu(x), False
    x3 = x.reshape(shape[0], -1, shape[-1]).to(dtype)
    # Folding GRN into per-sample weights pays while a sample has more sites than the weight
    # has rows; in late stages (7x7 maps, wide layers) scaling the activations is cheaper.
    fold = x3.shape[1] >= weight.shape[0]
    with autocast_off(x):
        if fold and grad:
            out = _GRNLinearFunction.apply(x3, gamma, beta, weight, bias, res3, gelu, eps)
        elif fold:
            out = _grn_linear_forward(x3, gamma, beta, weight, bias, res3, eps)[0]
        elif grad:
            out = _GRNThenLinearFunction.apply(x3, gamma, beta, weight, bias, res3, gelu, eps)
        else:
            nx = _norm_stats(x3, eps)[2]
            scale, b_eff = _fold_scale_bias(gamma, beta, weight, bias, nx, dtype)
            base = b_eff if res3 is None else res3 + b_eff
            out = torch.addmm(base.reshape(-1, weight.shape[0]), (x3 * scale).flatten(0, 1),
                              weight.to(dtype).t()).view(*x3.shape[:2], -1)
    out = out.view(*shape[:-1], weight.shape[0])
    if residual is not None and res3 is None:
        out = residual + out
    return out


class _GRNRowsFunction(torch.autograd.Function):
    """GRN(act(x)) at a subset of rows: statistics over all K sites of each sample, output only
    at ``rows`` (flat indices into N*K, the same number per sample), with a fused backward."""

    @staticmethod
    def forward(ctx, x3, gamma, beta, rows, gelu, eps):
        n, _, c = x3.shape
        h = F.gelu(x3) if gelu else x3
        gx, denom, nx = _norm_stats(h, eps)
        scale = torch.addcmul(torch.ones_like(nx), gamma.to(nx.dtype), nx)
        hm = h.reshape(-1, c).index_select(0, rows).view(n, -1, c)
        ctx.gelu = gelu
        ctx.save_for_backward(x3, h if gelu else None, gamma, rows, gx, denom, nx, scale)
        return torch.addcmul(beta.to(h.dtype), hm, scale.to(h.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x3, h, gamma, rows, gx, denom, nx, scale = ctx.saved_tensors
        h = x3 if h is None else h
        n, _, c = h.shape
        acc = gx.dtype
        g = grad_out.to(h.dtype)
        hm = h.reshape(-1, c).index_select(0, rows).view(n, -1, c)
        gx_dot = (g * hm).sum(dim=1, keepdim=True, dtype=acc)           # (N, 1, C)
        grad_gamma = (gx_dot * nx).sum(dim=(0, 1)).to(gamma.dtype)
        grad_beta = g.sum(dim=(0, 1), dtype=acc).to(gamma.dtype)
        t = _norm_backward(gx_dot * gamma.to(acc), gx, denom)
        grad_h = (h * t.to(h.dtype)).reshape(-1, c)                     # through the norm
        grad_h.index_add_(0, rows, (g * scale.to(g.dtype)).reshape(-1, c))
        grad_h = grad_h.view_as(h)
        if ctx.gelu:
            grad_h = torch.ops.aten.gelu_backward(grad_h, x3)
        return grad_h, grad_gamma, grad_beta, None, None, None


def grn_rows(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, rows: torch.Tensor,
             gelu: bool = False, *, eps: float) -> torch.Tensor:
    """``grn_reference(act(x), gamma, beta, eps)`` evaluated only at ``rows``: (N, M, C) from
    x (N, ..., C).

    GRN's norm still sees every site of a sample (the result is exactly the rows of the full
    GRN output); only the output, and what follows it, is restricted to the rows. ``rows`` are
    flat indices into the N * K sites (K = sites per sample), M per sample, grouped by sample.
    ``gelu=True`` applies exact GELU to ``x`` first. Statistics in float32 as in ``fused_grn``.
    """
    n, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(n, -1, c)
    if x3.shape[1] == 0:  # no sites, so no rows: an empty (N, 0, C)
        h = F.gelu(x3) if gelu else x3
        return h.reshape(-1, c).index_select(0, rows).view(n, -1, c)
    with autocast_off(x):
        return _GRNRowsFunction.apply(x3, gamma, beta, rows, gelu, eps)
