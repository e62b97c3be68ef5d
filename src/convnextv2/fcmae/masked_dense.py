"""Masked dense convolution: the FCMAE encoder as the paper trained it (and the sparse reference).

The full dense network runs on every position; masked positions are set to zero after each
operation that could fill them: after the stem, after every depthwise conv, before GRN's norm
(so GRN's L2 norm only sees a sample's visible sites), after each block and after each
downsampling. At visible sites this gives exactly the numbers of sparse convolution. Each block
is a region that may be compiled on its own (``runtime.compiled_region``, ``"masked_block"``).
The encoder's gradient checkpointing applies, with the dense model's units (``run_stage``).
"""
from __future__ import annotations

from functools import partial

import torch

from torch import nn

from ..models.dwconv import depthwise_conv
from ..models.grn_fused import grn_linear
from ..models.model import Block, ConvNeXtV2, run_stage
from ..models.runtime import compiled_region, plain_math
from .masking import check_input, upsample_mask
from .sparse import LEVELS


def stage_keep_masks(mask: torch.Tensor, grid_hw, dtype) -> list[torch.Tensor]:
    """1 = visible, at each stage's resolution: (N, 1, H_k, W_k), computed once per forward."""
    keep = (1 - mask).to(dtype)
    return [upsample_mask(keep, grid_hw, 2 ** (LEVELS - k)).contiguous() for k in range(LEVELS + 1)]


def _fusable(block: Block) -> bool:
    """GELU, GRN, pwconv2 and the skip can run as one fused node (not while exporting)."""
    return (block.grn is not None and block.layer_scale is None and not plain_math()
            and type(block.act) is nn.GELU and block.act.approximate == "none")


def masked_block(block: Block, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep_last = keep.permute(0, 2, 3, 1)  # (N, H, W, 1) view for the channels-last part
    # In-place multiplies only on results that autograd does not keep for backward
    # (conv, Linear and add outputs), so no extra activation copies are made.
    y = depthwise_conv(block.dwconv, x).mul_(keep).permute(0, 2, 3, 1)
    y = block.norm(y)
    plain_skip = isinstance(block.drop_path, nn.Identity) or not block.training
    if _fusable(block):
        # zero the masked sites before GELU (GELU(0) = 0), so GRN's norm sees only visible
        # sites; GELU, GRN, pwconv2 and the skip connection then run as one fused node
        h = block.pwconv1(y).mul_(keep_last)
        out = grn_linear(h, block.grn.gamma, block.grn.beta, block.pwconv2.weight,
                         block.pwconv2.bias, residual=x.permute(0, 2, 3, 1) if plain_skip else None,
                         gelu=True, eps=block.grn.eps)
    else:
        h = block.act(block.pwconv1(y))
        if block.grn is not None:
            h = block.grn(h.mul_(keep_last))
        out = block.pwconv2(h)
        if block.layer_scale is not None:
            out = out * block.layer_scale
        if plain_skip:
            out = out + x.permute(0, 2, 3, 1)
    out = out.permute(0, 3, 1, 2)
    if plain_skip:
        return out.mul_(keep)
    return (x + block.drop_path(out)).mul_(keep)


def masked_dense_forward_features(model: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor
                                  ) -> torch.Tensor:
    """The encoder's (N, d3, H/p, W/p) map with masked cells exactly 0, computed densely."""
    grid_hw = check_input(model, imgs, mask)
    block_fn = compiled_region(model, "masked_block", masked_block)
    keeps = stage_keep_masks(mask, grid_hw, imgs.dtype if imgs.is_floating_point() else torch.float32)
    x = model.stem(imgs.contiguous(memory_format=torch.channels_last)).mul_(keeps[0])  # as the model
    for k, stage in enumerate(model.stages):
        downsample = partial(_masked_downsample, stage.downsample, keep=keeps[k]) if k > 0 else None
        blocks = [partial(block_fn, block, keep=keeps[k]) for block in stage.blocks]
        x = run_stage(stage.grad_checkpointing, x, downsample, blocks)
    return x


def _masked_downsample(downsample: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return downsample(x).mul_(keep)
