"""Linear probing: how good a frozen encoder's features are, read by one trained Linear layer.

As in MAE's probing, a BatchNorm without affine parameters standardises the pooled features
before the new Linear head; only that head trains. For saving, the BatchNorm is folded into the
Linear, so a probe's weight files are plain ``ConvNeXtV2`` classifiers.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

PROBE_INIT_STD = 0.01  # the probe head's initial weight std (MAE's probing value)


class LinearProbe:
    """Freeze ``model``, give it a fresh head (``reset_classifier``) behind a non-affine
    BatchNorm1d, and say how it trains (``train_mode``) and saves (``folded``)."""

    def __init__(self, model: nn.Module, num_classes: int, std: float = PROBE_INIT_STD):
        model.requires_grad_(False)
        model.reset_classifier(num_classes, init_std=std)
        fc = model.head.fc
        fc.requires_grad_(True)
        model.head.fc = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False,
                                                     eps=1e-6), fc)
        self.model = model

    def train_mode(self) -> None:
        """The frozen encoder in eval mode (no drop path), the head's BN updating its stats."""
        self.model.eval()
        self.model.head.fc.train()

    @staticmethod
    def folded(model: nn.Module) -> nn.Module:
        """A copy with the BN folded into the Linear (identical outputs in eval mode); a model
        without a probe head is copied as it is."""
        model = copy.deepcopy(model)
        fc = model.head.fc
        if isinstance(fc, nn.Sequential):
            bn, lin = fc[0], fc[1]
            scale = (bn.running_var + bn.eps).rsqrt()
            folded = nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device,
                               dtype=lin.weight.dtype)
            with torch.no_grad():
                folded.weight.copy_(lin.weight * scale)
                folded.bias.copy_(lin.bias - folded.weight @ bn.running_mean)
            model.head.fc = folded
        return model
