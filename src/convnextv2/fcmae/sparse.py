"""The FCMAE encoder run on the visible sites only (sparse convolution without a sparse library).

Visible sites of a batch are held as a regular (N, K, C) tensor: every sample keeps the same
number of patches, so K is the same for every sample at every stage. Sites are ordered by
visible patch (row-major over the patch grid), and inside a patch in recursive 2x2 (Z-order)
order. Then each 2x2 group of children is contiguous, the 2x2/2 downsampling convolution is a
reshape to (N, K/4, 4C) plus one matrix multiply, and stage k+1's order is stage k's order with
groups of four merged. The stem is a gather of the visible pixel patches and the stem conv on
them alone. LayerNorm, the Linear layers, GELU and GRN act on the (N, K, C) list as they are
(``Block.mlp``, with GRN fused into the Linear after it), so their cost scales with the visible
fraction. Only the depthwise 7x7 needs neighbours (submanifold semantics: outputs only at
visible sites, masked neighbours count as zero). Two kernels for it, with the same numbers:
``dwconv="grid"`` (default) scatters the sites into a zero-filled channels-last grid, runs the
library's dense depthwise convolution and gathers the visible outputs back;
``dwconv="triton"`` (``triton_dwconv``, CUDA) computes the visible outputs only, reading
neighbours through a per-stage neighbour table.

Everything uses the dense model's own parameters, so gradients land on the dense model.

No host syncs: the layout is built from the mask with a stable sort (``mask_order``) and the
number of visible cells K, which the caller knows from the mask ratio (``SparseLayout.from_mask(
..., num_visible=K)``); there is no ``nonzero`` and nothing is read back from the device. The mask
is checked with an asynchronous device assert (at once, with a ValueError, for CPU masks). Z-order
offsets are computed on the device and cached per device. So the forward and backward compile
as one graph (``torch.compile(fullgraph=True)``) and a whole training step can be captured in a
CUDA graph (``benchmarks/train_step.py``). Each block is a region that may be compiled on its
own (``runtime.compiled_region``, name ``"sparse_block"``).

On the CPU the depthwise conv's weight gradient runs as a forward conv with the batch folded into
the channels (``models.dwconv.depthwise_weight_grad``, as in the dense model's blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from torch import nn

from ..models.dwconv import depthwise_weight_grad
from ..models.model import Block, ConvNeXtV2, run_stage
from ..models.runtime import autocast_dtype, autocast_off, compiled_region, compiling
from .masking import check_input, check_mask, count_visible, mask_order

LEVELS = 3  # downsamplings between stage 0 and the patch grid (stage 3)
DWCONV_KERNELS = ("grid", "triton")  # the sparse depthwise: see submanifold_dwconv


def _morton_bits(side: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-order (dy, dx) computed on ``device`` from an arange: no host data, no copy to it."""
    z = torch.arange(side * side, device=device)
    dy, dx = torch.zeros_like(z), torch.zeros_like(z)
    for j in range(side.bit_length() - 1):
        dx = dx | (((z >> (2 * j)) & 1) << j)
        dy = dy | (((z >> (2 * j + 1)) & 1) << j)
    return dy, dx


_OFFSETS: dict = {}  # (side, device) -> (dy, dx): made once per device, then reused


def morton_offsets(side: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) of the side*side cells of a square block in recursive 2x2 (Z) order.

    Consecutive groups of four are 2x2 squares ordered (0,0), (0,1), (1,0), (1,1). Computed
    on the device itself (no host-to-device copy) and cached per (side, device) in eager mode.
    """
    if side < 1 or side & (side - 1):
        raise ValueError(f"side must be a power of two, got {side}")
    device = torch.device(device if device is not None else "cpu")
    if compiling():
        return _morton_bits(side, device)
    key = (side, device)
    if key not in _OFFSETS:
        _OFFSETS[key] = _morton_bits(side, device)
    return _OFFSETS[key]


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
    def from_mask(cls, mask: torch.Tensor, grid_hw, num_visible: int | None = None,
                  order: torch.Tensor | None = None, check: bool = True) -> "SparseLayout":
        """The layout of ``mask`` (N, L), 1 = masked.

        ``num_visible``: the cells every sample keeps. Given, nothing is read back from the
        device (the mask is checked asynchronously unless ``check=False``, or at once when it
        lies on the CPU). Omitted, it is counted from the mask: free on the CPU, one
        device-to-host sync on an accelerator, impossible inside torch.compile.
        ``order``: ``mask_order(mask)`` when the caller has it already.
        """
        hp, wp = (int(v) for v in grid_hw)
        n, cells = mask.shape
        if cells != hp * wp:
            raise ValueError(f"mask has {cells} cells per sample, the {hp}x{wp} grid needs {hp * wp}")
        if num_visible is None:
            if compiling():
                raise ValueError("inside torch.compile the number of visible cells must be "
                                 "given (num_visible=); it cannot be read from the mask")
            kp = count_visible(mask)
        else:
            kp = int(num_visible)
            if not 0 <= kp <= cells:
                raise ValueError(f"num_visible must be in [0, {cells}], got {kp}")
            if check:
                check_mask(mask, kp)
        if order is None:
            order = mask_order(mask)
        visible = order[:, :kp]
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


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C): p x p patches row-major, inside a patch (row, column,
    channel). NHWC first: two cheap copies beat one slow six-axis one."""
    n, c, h, w = imgs.shape
    hp, wp = h // p, w // p
    x = imgs.permute(0, 2, 3, 1).contiguous().view(n, hp, p, wp, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hp * wp, p * p * c)


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
    # whole patches are rows: an index_select of rows copies the visible ones out, already
    # channels-last for the conv
    patch_rows = patchify(imgs, p).view(n * hp * wp, p * p * c)
    index = layout.visible + torch.arange(n, device=imgs.device).view(n, 1) * (hp * wp)
    patches = patch_rows.index_select(0, index.reshape(-1)).view(-1, p, p, c).permute(0, 3, 1, 2)
    x = F.conv2d(patches, conv.weight, conv.bias, stride=conv.stride)   # (M, d0, 8, 8)
    side = x.shape[-1]
    dy, dx = morton_offsets(side, imgs.device)
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], side * side, -1).index_select(1, dy * side + dx)
    x = x.reshape(n, -1, x.shape[-1])
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _grid_forward(x: torch.Tensor, weight: torch.Tensor, flat_index: torch.Tensor,
                  n: int, h: int, w: int) -> torch.Tensor:
    """Depthwise 'same' conv of the (N, K, C) sites at the sites only, masked neighbours zero:
    the sites go into a zero-filled channels-last (N, C, H, W) grid, the library's dense
    depthwise conv runs on it, and the outputs at the sites are gathered back (no bias)."""
    out = F.conv2d(_to_grid(x, flat_index, n, h, w), weight, None,
                   padding=weight.shape[-1] // 2, groups=x.shape[-1])
    return _from_grid(out, flat_index).view(x.shape)


def _grid_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   flat_index: torch.Tensor, n: int, h: int, w: int, need_input: bool,
                   need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight) of ``_grid_forward``; an unneeded one comes back empty.

    No scatter_add: the input gradient at the sites is a gather of the full-grid input
    gradient, itself a forward depthwise conv with the flipped kernel (faster on the CPU than
    the generic backward kernel). Only the sites were kept (not the zero-filled grid: 40% of
    its memory at mask ratio 0.6); the grid is rebuilt with one scatter for the weight gradient.
    """
    c = x.shape[-1]
    pad = weight.shape[-1] // 2
    grad_grid = _to_grid(grad_y.contiguous(), flat_index, n, h, w)
    grad_x, grad_weight = x.new_empty(0), weight.new_empty(0)
    if need_input:
        grad_x = _from_grid(F.conv2d(grad_grid, weight.flip(-1, -2), None, padding=pad, groups=c),
                            flat_index).view(x.shape)
    if need_weight:
        grad_weight = depthwise_weight_grad(grad_grid, _to_grid(x, flat_index, n, h, w), weight)
    return grad_x, grad_weight


def _grid_save(ctx, x, weight, flat_index, n, h, w):
    ctx.save_for_backward(x, weight, flat_index)  # the sites: never a grid
    ctx.shape = (n, h, w)


def _grid_grads(ctx, grad_y, backward):
    x, weight, flat_index = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_w = backward(grad_y, x, weight, flat_index, *ctx.shape, need_x, need_w)
    return (grad_x if need_x else None), (grad_w if need_w else None), None, None, None, None


# Compiled code calls the pair as torch.library custom ops: opaque to the compiler, so it keeps
# for backward what _grid_save keeps. Traced as plain tensor ops, the compiler kept the
# zero-filled input grid and the conv's output grid of every block instead (two maps where
# the sites are 0.4 of one), and the compiled sparse step used more memory than the eager one.
grid_dwconv = torch.library.custom_op("convnextv2::grid_dwconv", _grid_forward, mutates_args=())
grid_dwconv_backward = torch.library.custom_op("convnextv2::grid_dwconv_backward", _grid_backward,
                                               mutates_args=())
grid_dwconv.register_fake(lambda x, weight, flat_index, n, h, w: torch.empty_like(x))
grid_dwconv_backward.register_fake(
    lambda grad_y, x, weight, flat_index, n, h, w, need_input, need_weight: (
        torch.empty_like(x) if need_input else x.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0)))
grid_dwconv.register_autograd(lambda ctx, grad_y: _grid_grads(ctx, grad_y, grid_dwconv_backward),
                              setup_context=lambda ctx, inputs, output: _grid_save(ctx, *inputs))


class _GridDepthwise(torch.autograd.Function):
    """Eager calls: the same two functions without the custom-op dispatch, which costs
    0.1-0.2 ms of host time per block and step (measured on the CPU): a lot for a GPU step that
    the host already bounds when it is not captured in a CUDA graph."""

    @staticmethod
    def forward(ctx, x, weight, flat_index, n, h, w):
        _grid_save(ctx, x, weight, flat_index, n, h, w)
        return _grid_forward(x, weight, flat_index, n, h, w)

    @staticmethod
    def backward(ctx, grad_y):
        return _grid_grads(ctx, grad_y, _grid_backward)


def _to_grid(x: torch.Tensor, flat_index: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N, K, C) sites -> zero-filled (N, C, H, W) grid in channels-last memory."""
    c = x.shape[-1]
    grid = x.new_zeros(n * h * w, c).index_copy_(0, flat_index, x.reshape(-1, c))
    return grid.view(n, h, w, c).permute(0, 3, 1, 2)


def _from_grid(grid: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Rows of a channels-last (N, C, H, W) grid at ``flat_index``: (len, C)."""
    c = grid.shape[1]
    return grid.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, flat_index)


def resolve_dwconv(dwconv: str, x: torch.Tensor) -> str:
    """The depthwise kernel that runs on ``x``: "triton" only where ``triton_dwconv`` can run
    (CUDA; CPU under Triton's interpreter, outside torch.compile), else "grid"."""
    if dwconv not in DWCONV_KERNELS:
        raise ValueError(f"dwconv must be one of {DWCONV_KERNELS}, got {dwconv!r}")
    if dwconv == "triton":
        from .triton_dwconv import supported  # imports Triton (half a second): only when asked

        if not supported(x) or (x.device.type == "cpu" and compiling()):
            return "grid"
    return dwconv


def submanifold_dwconv(conv: torch.nn.Conv2d, x: torch.Tensor, flat_index: torch.Tensor,
                       hw: tuple[int, int], dwconv: str = "grid",
                       neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise conv with outputs at the sites only, masked neighbours counting as zero.

    ``dwconv``: "grid" (the library's dense conv on the zero-filled grid) or "triton" (kernels
    that compute the sites only, ``triton_dwconv``; "grid" where Triton cannot run, see
    ``resolve_dwconv``). ``neighbours``: the stage's ``triton_dwconv.neighbour_table``, shared
    by its blocks (built here when not given); unused by "grid".
    """
    kernel = resolve_dwconv(dwconv, x)
    weight, bias = conv.weight, conv.bias
    dtype = autocast_dtype(x)  # autocast's dtype when it is on, else x's
    x, weight = x.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    with autocast_off(x):
        if kernel == "triton":
            from .triton_dwconv import dwconv_at_sites, neighbour_table

            if neighbours is None:
                neighbours = neighbour_table(flat_index, x.shape[0], *hw, weight.shape[-1])
            return dwconv_at_sites(x.reshape(-1, x.shape[-1]), weight, bias, neighbours).view_as(x)
        args = (x, weight, flat_index, x.shape[0], *hw)
        y = grid_dwconv(*args) if compiling() else _GridDepthwise.apply(*args)
        return y if bias is None else y + bias


def sparse_block(block: Block, x: torch.Tensor, flat_index: torch.Tensor,
                 hw: tuple[int, int], dwconv: str = "grid",
                 neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """One block on the (N, K, C) sites; ``Block.mlp`` (fused GRN + Linear) works on them as is.
    ``dwconv``, ``neighbours``: the depthwise kernel, see ``submanifold_dwconv``."""
    y = submanifold_dwconv(block.dwconv, x, flat_index, hw, dwconv, neighbours)
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


def sparse_encode(model: ConvNeXtV2, imgs: torch.Tensor, layout: SparseLayout,
                  dwconv: str = "grid") -> torch.Tensor:
    """The encoder on the visible sites: (N, Kp, d3), one row per visible patch.
    ``dwconv``: the depthwise kernel, see ``submanifold_dwconv``. The model's gradient
    checkpointing (``set_grad_checkpointing``) applies: units as in the dense model."""
    block_fn = compiled_region(model, "sparse_block", sparse_block)
    kernel = resolve_dwconv(dwconv, imgs)  # decided once: the tables and every block agree
    x = sparse_stem(model, imgs, layout)
    for k, stage in enumerate(model.stages):
        tables = {}  # kernel size -> neighbour table: one per stage, shared by its blocks
        blocks = []
        for block in stage.blocks:
            neighbours = None
            if kernel == "triton":
                from .triton_dwconv import neighbour_table

                ks = block.dwconv.weight.shape[-1]
                if ks not in tables:
                    tables[ks] = neighbour_table(layout.flat_index[k], layout.batch,
                                                 *layout.stage_hw[k], ks)
                neighbours = tables[ks]
            blocks.append(partial(block_fn, block, flat_index=layout.flat_index[k],
                                  hw=layout.stage_hw[k], dwconv=kernel, neighbours=neighbours))
        downsample = partial(sparse_downsample, stage.downsample) if k > 0 else None
        x = run_stage(stage.grad_checkpointing, x, downsample, blocks)
    return x


def scatter_to_grid(x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """(N, Kp, C) patch features -> (N, C, Hp, Wp) map, exactly zero at masked cells."""
    n, kp, c = x.shape
    hp, wp = layout.grid_hw
    grid = x.new_zeros(n * hp * wp, c).index_copy_(0, layout.flat_index[LEVELS], x.reshape(n * kp, c))
    return grid.view(n, hp, wp, c).permute(0, 3, 1, 2)


def sparse_forward_features(model: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor,
                            num_visible: int | None = None, *, order: torch.Tensor | None = None,
                            check: bool = True, dwconv: str = "grid") -> torch.Tensor:
    """The encoder's (N, d3, H/p, W/p) map computed on visible cells; masked cells exactly 0.

    ``num_visible``: the cells each sample keeps, known to the caller (FCMAE knows it from
    its mask ratio): then nothing is read back from the device. Omitted, it is counted from
    the mask. ``order`` and ``check``: see ``SparseLayout.from_mask``. ``dwconv``: the blocks'
    depthwise kernel, "grid" or "triton" (see ``submanifold_dwconv``).
    """
    grid_hw = check_input(model, imgs, mask)
    layout = SparseLayout.from_mask(mask, grid_hw, num_visible, order=order, check=check)
    if layout.num_visible == 0:  # everything masked (tiny grids): nothing to compute
        return imgs.new_zeros(imgs.shape[0], model.num_features, *grid_hw)
    return scatter_to_grid(sparse_encode(model, imgs, layout, dwconv), layout)
