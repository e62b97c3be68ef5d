"""Masked dense convolution: the FCMAE encoder as the paper trained it (and the sparse reference).

The full dense network runs on every position; masked positions are set to zero after each
operation that could fill them: after the stem, after every depthwise conv, before GRN's norm
(so GRN's L2 norm only sees a sample's visible sites), after each block and after each
downsampling. At visible sites this gives exactly the numbers of sparse convolution.
"""
from __future__ import annotations

import torch

from .fused_grn import grn_linear
from .masking import upsample_mask
from .model import Block, ConvNeXtV2
from .sparse import LEVELS, check_input


def stage_keep_masks(mask: torch.Tensor, grid_hw, dtype) -> list[torch.Tensor]:
    """1 = visible, at each stage's resolution: (N, 1, H_k, W_k), computed once per forward."""
    keep = (1 - mask).to(dtype)
    return [upsample_mask(keep, grid_hw, 2 ** (LEVELS - k)).contiguous() for k in range(LEVELS + 1)]


def masked_block(block: Block, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep_last = keep.permute(0, 2, 3, 1)  # (N, H, W, 1) view for the channels-last part
    # In-place multiplies only on results that autograd does not keep for backward
    # (conv, GELU and add outputs), so no extra activation copies are made.
    y = block.dwconv(x).mul_(keep).permute(0, 2, 3, 1)
    y = block.norm(y)
    y = block.act(block.pwconv1(y))
    if block.grn is not None:
        y = grn_linear(y.mul_(keep_last), block.grn.gamma, block.grn.beta,
                       block.pwconv2.weight, block.pwconv2.bias)
    else:
        y = block.pwconv2(y)
    if block.layer_scale is not None:
        y = y * block.layer_scale
    return (x + block.drop_path(y.permute(0, 3, 1, 2))).mul_(keep)


def masked_dense_forward_features(model: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor
                                  ) -> torch.Tensor:
    """The encoder's (N, d3, H/p, W/p) map with masked cells exactly 0, computed densely."""
    grid_hw = check_input(model, imgs, mask)
    keeps = stage_keep_masks(mask, grid_hw, imgs.dtype if imgs.is_floating_point() else torch.float32)
    x = model.stem(imgs).mul_(keeps[0])
    for k, stage in enumerate(model.stages):
        if k > 0:
            x = stage.downsample(x).mul_(keeps[k])
        for block in stage.blocks:
            x = masked_block(block, x, keeps[k])
    return x
