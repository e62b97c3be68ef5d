"""The FCMAE encoder run on the visible sites only (sparse convolution without a sparse library).

Visible sites of a batch are held as a regular (N, K, C) tensor: every sample keeps the same
number of patches, so K is the same for every sample at every stage. Sites are ordered by
visible patch (row-major over the patch grid), and inside a patch in recursive 2x2 (Z-order)
order. Then each 2x2 group of children is contiguous, the 2x2/2 downsampling convolution is a
reshape to (N, K/4, 4C) plus one matrix multiply, and stage k+1's order is stage k's order with
groups of four merged. The stem is a gather of the visible pixel patches and the stem conv on
them alone. LayerNorm, the Linear layers, GELU and GRN act on the (N, K, C) list as they are
(``Block.mlp``, with GRN fused into the Linear after it), so their cost scales with the visible
fraction. Only the depthwise 7x7 needs neighbours: it scatters the
sites into a zero-filled channels-last grid, runs the dense depthwise convolution and gathers
the visible outputs back (submanifold semantics: outputs only at visible sites, masked
neighbours count as zero).

Everything uses the dense model's own parameters, so gradients land on the dense model.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from torch import nn

from ..models.model import Block, ConvNeXtV2

LEVELS = 3  # downsamplings between stage 0 and the patch grid (stage 3)


@lru_cache(maxsize=None)
def _morton_offsets_list(side: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    levels = side.bit_length() - 1
    dys, dxs = [], []
    for z in range(side * side):
        dy = dx = 0
        for j in range(levels):
            dx |= ((z >> (2 * j)) & 1) << j
            dy |= ((z >> (2 * j + 1)) & 1) << j
        dys.append(dy)
        dxs.append(dx)
    return tuple(dys), tuple(dxs)


def morton_offsets(side: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) of the side*side cells of a square block in recursive 2x2 (Z) order.

    Consecutive groups of four are 2x2 squares ordered (0,0), (0,1), (1,0), (1,1).
    """
    if side < 1 or side & (side - 1):
        raise ValueError(f"side must be a power of two, got {side}")
    dys, dxs = _morton_offsets_list(side)
    return (torch.tensor(dys, dtype=torch.long, device=device),
            torch.tensor(dxs, dtype=torch.long, device=device))


@dataclass
class SparseLayout:
    """Where the visible sites of a batch sit, at the patch grid and at every stage.

    ``visible``: (N, Kp) indices of the visible patches, row-major, ascending per sample.
    ``stage_hw[k]``: the (H, W) of stage k's feature map.
    ``flat_index[k]``: (N * K_k,) positions of stage k's sites in the flattened
    (N * H_k * W_k) grid, in the site order of the (N, K_k, C) tensors.
    """

    grid_hw: tuple[int, int]
    visible: torch.Tensor
    stage_hw: list[tuple[int, int]]
    flat_index: list[torch.Tensor]

    @property
    def batch(self) -> int:
        return self.visible.shape[0]

    @property
    def num_visible(self) -> int:
        return self.visible.shape[1]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, grid_hw) -> "SparseLayout":
        hp, wp = (int(v) for v in grid_hw)
        n, cells = mask.shape
        if cells != hp * wp:
            raise ValueError(f"mask has {cells} cells per sample, the {hp}x{wp} grid needs {hp * wp}")
        vis = mask == 0
        counts = vis.sum(dim=1)
        if n and bool((counts != counts[0]).any()):
            raise ValueError(
                "the sparse backend needs the same number of visible cells in every sample, got "
                f"{sorted(set(counts.tolist()))}; use backend='dense' for such masks")
        kp = int(counts[0]) if n else 0
        visible = vis.nonzero()[:, 1].view(n, kp)
        rows, cols = visible // wp, visible % wp
        stage_hw, flat_index = [], []
        batch_offset = torch.arange(n, device=mask.device).view(n, 1, 1)
        for k in range(LEVELS + 1):
            side = 2 ** (LEVELS - k)
            h, w = hp * side, wp * side
            dy, dx = morton_offsets(side, mask.device)
            pos = (rows.unsqueeze(-1) * side + dy) * w + cols.unsqueeze(-1) * side + dx
            flat_index.append((pos + batch_offset * (h * w)).reshape(-1))
            stage_hw.append((h, w))
        return cls((hp, wp), visible, stage_hw, flat_index)


def sparse_stem(model: ConvNeXtV2, imgs: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """Stem conv (kernel = stride) and its LayerNorm on the visible sites: (N, K0, d0).

    Only the visible p x p pixel patches are copied out of the image; the stem conv runs on
    them (channels-last, so its output rows are sites), and the 8x8 stage-0 sites of each
    patch are put in Z order.
    """
    conv, norm = model.stem.conv, model.stem.norm
    n, c, h, w = imgs.shape
    hp, wp = layout.grid_hw
    p = h // hp
    # NHWC first (a cheap transpose), then whole patches are rows: an index_select of rows
    # copies the visible ones out, already channels-last for the conv
    patch_rows = (imgs.permute(0, 2, 3, 1).contiguous().view(n, hp, p, wp, p, c)
                  .permute(0, 1, 3, 2, 4, 5).reshape(n * hp * wp, p * p * c))
    index = layout.visible + torch.arange(n, device=imgs.device).view(n, 1) * (hp * wp)
    patches = patch_rows.index_select(0, index.reshape(-1)).view(-1, p, p, c).permute(0, 3, 1, 2)
    x = F.conv2d(patches, conv.weight, conv.bias, stride=conv.stride)   # (M, d0, 8, 8)
    side = x.shape[-1]
    dy, dx = morton_offsets(side, imgs.device)
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], side * side, -1).index_select(1, dy * side + dx)
    x = x.reshape(n, -1, x.shape[-1])
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class _SubmanifoldDepthwise(torch.autograd.Function):
    """Depthwise conv evaluated at the sites only, on a zero-filled channels-last grid.

    Written as one autograd node so that backward needs no scatter_add: the gradient w.r.t. the
    sites is a gather of the (full-grid) input gradient, which itself is a forward depthwise
    conv with the flipped kernel (faster on CPU than the generic backward kernel). The
    zero-filled input grid is kept for the weight gradient (memory of one stage map per block,
    the same as the dense network keeps).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, flat_index, n, h, w):
        c = x.shape[-1]
        grid = _to_grid(x, flat_index, n, h, w)
        out = F.conv2d(grid, weight, None, padding=weight.shape[-1] // 2, groups=c)
        y = _from_grid(out, flat_index).view_as(x)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(grid, weight, flat_index)
        ctx.shape = (n, h, w)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grid, weight, flat_index = ctx.saved_tensors
        n, h, w = ctx.shape
        c = grid.shape[1]
        pad = weight.shape[-1] // 2
        grad_y = grad_y.contiguous()
        grad_grid = _to_grid(grad_y, flat_index, n, h, w)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(-1, -2)
            grad_x = _from_grid(F.conv2d(grad_grid, flipped, None, padding=pad, groups=c),
                                flat_index).view_as(grad_y)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad_grid, grid, weight, None, (1, 1), (pad, pad), (1, 1), False, (0, 0), c,
                (False, True, False))[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, c).sum(0)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _to_grid(x: torch.Tensor, flat_index: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N, K, C) sites -> zero-filled (N, C, H, W) grid in channels-last memory."""
    c = x.shape[-1]
    grid = x.new_zeros(n * h * w, c).index_copy_(0, flat_index, x.reshape(-1, c))
    return grid.view(n, h, w, c).permute(0, 3, 1, 2)


def _from_grid(grid: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Rows of a channels-last (N, C, H, W) grid at ``flat_index``: (len, C)."""
    c = grid.shape[1]
    return grid.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, flat_index)


def submanifold_dwconv(conv: torch.nn.Conv2d, x: torch.Tensor, flat_index: torch.Tensor,
                       hw: tuple[int, int]) -> torch.Tensor:
    """Depthwise conv with outputs at the sites only, masked neighbours counting as zero."""
    weight, bias = conv.weight, conv.bias
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif bias is not None:
        bias = bias.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _SubmanifoldDepthwise.apply(x, weight, bias, flat_index, x.shape[0], *hw)


def sparse_block(block: Block, x: torch.Tensor, flat_index: torch.Tensor,
                 hw: tuple[int, int]) -> torch.Tensor:
    """One block on the (N, K, C) sites; ``Block.mlp`` (fused GRN + Linear) works on them as is."""
    y = submanifold_dwconv(block.dwconv, x, flat_index, hw)
    if isinstance(block.drop_path, nn.Identity) or not block.training:
        return block.mlp(y, residual=x)  # the skip connection is added inside the last matmul
    return x + block.drop_path(block.mlp(y))


def sparse_downsample(downsample, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm then the 2x2/2 conv as a matmul over each contiguous group of four sites."""
    norm, conv = downsample.norm, downsample.conv
    n, k, c = x.shape
    x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * c)
    return F.linear(x.reshape(n, k // 4, 4 * c), weight, conv.bias)


def sparse_encode(model: ConvNeXtV2, imgs: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """The encoder on the visible sites: (N, Kp, d3), one row per visible patch."""
    x = sparse_stem(model, imgs, layout)
    for k, stage in enumerate(model.stages):
        if k > 0:
            x = sparse_downsample(stage.downsample, x)
        for block in stage.blocks:
            x = sparse_block(block, x, layout.flat_index[k], layout.stage_hw[k])
    return x


def scatter_to_grid(x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """(N, Kp, C) patch features -> (N, C, Hp, Wp) map, exactly zero at masked cells."""
    n, kp, c = x.shape
    hp, wp = layout.grid_hw
    grid = x.new_zeros(n * hp * wp, c).index_copy_(0, layout.flat_index[LEVELS], x.reshape(n * kp, c))
    return grid.view(n, hp, wp, c).permute(0, 3, 1, 2)


def check_input(model: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """The patch grid of ``imgs``; raises if the image or the mask do not fit the model."""
    p = model.total_stride
    if imgs.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(imgs.shape)}")
    n, c, h, w = imgs.shape
    if c != model.config["in_chans"]:
        raise ValueError(f"the encoder takes {model.config['in_chans']} channels, got {c}")
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {p}")
    hp, wp = h // p, w // p
    if tuple(mask.shape) != (n, hp * wp):
        raise ValueError(f"mask must have shape ({n}, {hp * wp}) for {h}x{w} images with "
                         f"patch size {p}, got {tuple(mask.shape)}")
    return hp, wp


def sparse_forward_features(model: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor
                            ) -> torch.Tensor:
    """The encoder's (N, d3, H/p, W/p) map computed on visible cells; masked cells exactly 0."""
    grid_hw = check_input(model, imgs, mask)
    layout = SparseLayout.from_mask(mask, grid_hw)
    if layout.num_visible == 0:  # everything masked (tiny grids): nothing to compute
        return imgs.new_zeros(imgs.shape[0], model.num_features, *grid_hw)
    return scatter_to_grid(sparse_encode(model, imgs, layout), layout)
