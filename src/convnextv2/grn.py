"""Global Response Normalization (ConvNeXt V2, section 3).

GRN rescales each channel by how strong its global response is relative to the other channels
of the same sample, which keeps channels from collapsing onto each other.
"""
from __future__ import annotations

import torch
from torch import nn

GRN_EPS = 1e-6


def grn_scale(x: torch.Tensor) -> torch.Tensor:
    """Nx = Gx / mean_c(Gx), Gx the L2 norm over every axis but batch (first) and channel (last).

    Works for (N, H, W, C) maps and for (N, K, C) lists of visible sites alike. The sum of
    squares is taken in float32: in fp16 it overflows for ordinary activations.
    """
    dims = tuple(range(1, x.dim() - 1))
    gx = torch.linalg.vector_norm(x.float(), ord=2, dim=dims, keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + GRN_EPS)
    return nx.to(x.dtype)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """gamma * (x * Nx) + beta + x, written as one multiply-add: x * (1 + gamma * Nx) + beta."""
    nx = grn_scale(x)
    return torch.addcmul(beta.to(x.dtype), x, 1 + gamma.to(x.dtype) * nx)


class GRN(nn.Module):
    """GRN over the last (channel) axis; gamma and beta start at zero so GRN starts as identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.gamma, self.beta)
