"""Global Response Normalization (GRN), ConvNeXt V2 section 3.

What it computes, per sample, on a channels-last map x (N, H, W, C):

    Gx[c] = || x[:, :, c] ||_2 over H and W       global aggregation: one number per channel
    Nx[c] = Gx[c] / (mean over c of Gx + eps)     normalization: each channel against the others
    out   = gamma * (x * Nx) + beta + x           calibration, plus the input (a residual)

Why: ConvNeXt pretrained as a masked autoencoder without GRN shows feature collapse (many
channels dead or saturated, the rest largely redundant). Dividing each channel's global response
by the mean response over channels makes the channels compete, which keeps them diverse. With
gamma and beta starting at zero, a fresh GRN is the identity.

``grn_reference`` is that formula and the definition every faster path is tested against.
``GRN`` (and ``grn``) give the same numbers through ``grn_fused``, which exists for memory and
speed only, except where only the literal formula may run: exporting, or no spatial axis.
"""
from __future__ import annotations

import torch
from torch import nn

from .grn_fused import fused_grn
from .runtime import accumulation_dtype, plain_math

GRN_EPS = 1e-6


def grn_scale(x: torch.Tensor, eps: float = GRN_EPS) -> torch.Tensor:
    """Nx, the norm over every axis but batch (first) and channel (last) divided by its mean
    over channels: (N, 1, ..., 1, C). Works for (N, K, C) lists of visible sites as for maps.
    The sum of squares is taken in float32: in fp16 it overflows for ordinary activations."""
    dims = tuple(range(1, x.dim() - 1))
    gx = torch.linalg.vector_norm(x, ord=2, dim=dims, keepdim=True, dtype=accumulation_dtype(x))
    return (gx / (gx.mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


def grn_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                  eps: float = GRN_EPS) -> torch.Tensor:
    """GRN on channels-last ``x`` (N, ..., C), differentiated by autograd: the formula above,
    written as one multiply-add, ``x * (1 + gamma * Nx) + beta``."""
    nx = grn_scale(x, eps)
    return torch.addcmul(beta.to(x.dtype), x, 1 + gamma.to(x.dtype) * nx)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
        eps: float = GRN_EPS) -> torch.Tensor:
    """``grn_reference``'s numbers; through ``fused_grn`` unless there is no spatial axis or
    the run is being exported (``runtime.plain_math``)."""
    if x.dim() < 3 or plain_math():
        return grn_reference(x, gamma, beta, eps)
    return fused_grn(x, gamma, beta, eps)


class GRN(nn.Module):
    """GRN over the last (channel) axis; gamma and beta start at zero so GRN starts as identity."""

    def __init__(self, dim: int, eps: float = GRN_EPS):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.gamma, self.beta, self.eps)
