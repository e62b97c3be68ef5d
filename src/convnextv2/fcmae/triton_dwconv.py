"""The blocks' depthwise 7x7 evaluated at the visible sites only: Triton kernels.

The default sparse depthwise (``sparse.grid_dwconv``, ``dwconv="grid"``) scatters the
sites into a zero-filled grid of the whole stage, runs the library's dense depthwise convolution
(cuDNN, oneDNN) on it and keeps the outputs at the sites: with 60% of the image masked, 60% of
that convolution's work is thrown away, and the zero-filled grids (one in the forward, two in
the backward) are written in full. On the GPU it is the largest single item of the sparse step's
kernel time. These kernels (``dwconv="triton"``) never build a grid: each site reads its k*k
neighbours straight from the (M, C) site list through a neighbour table, -1 where the neighbour
is masked or off the map (it then counts as zero: the submanifold rule).

- ``neighbour_table``: (k*k, M) int32, tap-major; the row of the site at offset (dy, dx) of
  each site. Built once per stage (all blocks of a stage share it, forward and backward).
- forward: ``y[s, c] = b[c] + sum_t w[c, t] * x[nb[t, s], c]``;
- input gradient: the same kernel on the output gradient with the taps reversed (the site at
  offset o of s has s at offset -o, so the adjoint reads through the same table);
- weight gradient: ``gw[c, t] = sum_s g[s, c] * x[nb[t, s], c]``, reduced in float32 per block
  of sites into a partial-sum buffer that is then summed: deterministic, no atomics.

Sites are in Z order inside each visible patch, so a block of consecutive sites is a compact
square of the map and the neighbours it reads are mostly its own rows: they hit the cache.
Accumulation is in float32 whatever the input dtype (bf16 under autocast), as in cuDNN; in
float64 for float64 inputs (the exactness tests).

The kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the CPU tests check them. ``supported(tensor)`` says
whether they can run on a tensor; where they cannot (no Triton, a CPU tensor without the
interpreter), the caller keeps the PyTorch path, which gives the same numbers. They are
registered as ``torch.library.triton_op`` custom ops, so ``torch.compile(fullgraph=True)``
traces through them and a CUDA graph captures them like any other kernel.
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch on Linux; elsewhere the PyTorch path runs
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_M = 64   # sites per program (forward and input gradient)
BLOCK_M_WGRAD = 128  # sites per program of the weight gradient: fewer partial sums to add up


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supported(x: torch.Tensor) -> bool:
    """Whether these kernels can run on ``x``: Triton is installed and ``x`` is on a CUDA
    device, or on the CPU with Triton's interpreter switched on."""
    if triton is None:
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpreted())


def neighbour_table(flat_index: torch.Tensor, n: int, h: int, w: int, ks: int) -> torch.Tensor:
    """(ks*ks, M) int32: for tap t = ky*ks + kx and site s, the row of the site at
    (y + ky - ks//2, x + kx - ks//2) of s's sample, or -1 when that cell is off the map or not a
    site. ``flat_index``: (M,) positions of the sites in the flattened (N*H*W) map. Plain
    tensor ops on the device: no host sync, compiles with the rest."""
    m = flat_index.numel()
    dev = flat_index.device
    row_of = torch.full((n * h * w,), -1, dtype=torch.int32, device=dev)
    row_of.index_copy_(0, flat_index, torch.arange(m, dtype=torch.int32, device=dev))
    rest = flat_index % (h * w)
    y, x = rest // w, rest % w
    d = torch.arange(ks, device=dev) - ks // 2
    dy, dx = d.repeat_interleave(ks).view(-1, 1), d.repeat(ks).view(-1, 1)   # (ks*ks, 1)
    yy, xx = y.view(1, -1) + dy, x.view(1, -1) + dx                          # (ks*ks, M)
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    cell = (flat_index.view(1, -1) + dy * w + dx).clamp_(0, max(n * h * w - 1, 0))
    return torch.where(inside, row_of[cell], -1)


if triton is not None:

    @triton.jit
    def _dwconv_sites_kernel(x_ptr, nb_ptr, w_ptr, b_ptr, out_ptr, M, C,
                             KK: tl.constexpr, HAS_BIAS: tl.constexpr, F64: tl.constexpr,
                             BLOCK: tl.constexpr, BLOCK_CH: tl.constexpr):
        # x: (M, C) sites; nb: (KK, M) neighbour rows or -1; w: (KK, C) taps; out: (M, C)
        rm = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rc = tl.program_id(1) * BLOCK_CH + tl.arange(0, BLOCK_CH)
        m_ok = rm < M
        c_ok = rc < C
        ACC = tl.float64 if F64 else tl.float32
        acc = tl.zeros((BLOCK, BLOCK_CH), dtype=ACC)
        for t in tl.static_range(KK):
            nb = tl.load(nb_ptr + t * M + rm, mask=m_ok, other=-1)
            v = tl.load(x_ptr + nb.to(tl.int64)[:, None] * C + rc[None, :],
                        mask=(nb >= 0)[:, None] & c_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + t * C + rc, mask=c_ok, other=0.0)
            acc += v.to(ACC) * wt.to(ACC)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rc, mask=c_ok, other=0.0).to(ACC)[None, :]
        dst = rm.to(tl.int64)[:, None] * C + rc[None, :]
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _dwconv_sites_wgrad_kernel(x_ptr, nb_ptr, g_ptr, part_ptr, M, C,
                                   KK: tl.constexpr, F64: tl.constexpr,
                                   BLOCK: tl.constexpr, BLOCK_CH: tl.constexpr):
        # part: (programs along M, KK, C) partial sums of this program's sites
        pid_m = tl.program_id(0)
        rm = pid_m * BLOCK + tl.arange(0, BLOCK)
        rc = tl.program_id(1) * BLOCK_CH + tl.arange(0, BLOCK_CH)
        m_ok = rm < M
        c_ok = rc < C
        ACC = tl.float64 if F64 else tl.float32
        g = tl.load(g_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :],
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        for t in tl.static_range(KK):
            nb = tl.load(nb_ptr + t * M + rm, mask=m_ok, other=-1)
            v = tl.load(x_ptr + nb.to(tl.int64)[:, None] * C + rc[None, :],
                        mask=(nb >= 0)[:, None] & c_ok[None, :], other=0.0)
            s = tl.sum(v.to(ACC) * g, axis=0)
            tl.store(part_ptr + (pid_m * KK + t) * C + rc, s, mask=c_ok)

    def _block_c(c: int) -> int:
        """Channels per program: a power of two, at most 64 (register tiles of 64 x 64)."""
        return min(64, triton.next_power_of_2(c))

    @triton_op("convnextv2::dwconv_at_sites", mutates_args={})
    def _dwconv_at_sites_op(x: torch.Tensor, neighbours: torch.Tensor, taps: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
        m, c = x.shape
        out = torch.empty_like(x)
        if m == 0:
            return out
        bc = _block_c(c)
        wrap_triton(_dwconv_sites_kernel)[(triton.cdiv(m, BLOCK_M), triton.cdiv(c, bc))](
            x, neighbours, taps, bias if bias is not None else taps, out, m, c,
            KK=taps.shape[0], HAS_BIAS=bias is not None, F64=x.dtype == torch.float64,
            BLOCK=BLOCK_M, BLOCK_CH=bc)
        return out

    @triton_op("convnextv2::dwconv_at_sites_wgrad", mutates_args={})
    def _dwconv_at_sites_wgrad_op(x: torch.Tensor, neighbours: torch.Tensor,
                                  grad: torch.Tensor) -> torch.Tensor:
        m, c = x.shape
        kk = neighbours.shape[0]
        programs = triton.cdiv(m, BLOCK_M_WGRAD)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        part = torch.zeros(max(programs, 1), kk, c, device=x.device, dtype=acc)
        if m:
            bc = _block_c(c)
            wrap_triton(_dwconv_sites_wgrad_kernel)[(programs, triton.cdiv(c, bc))](
                x, neighbours, grad, part, m, c, KK=kk, F64=x.dtype == torch.float64,
                BLOCK=BLOCK_M_WGRAD, BLOCK_CH=bc, num_warps=8)
        return part.sum(0)


class SitesDepthwise(torch.autograd.Function):
    """``y = dwconv(x)`` at the sites: x (M, C), weight (C, 1, k, k), neighbours (k*k, M)."""

    @staticmethod
    def forward(ctx, x, weight, bias, neighbours):
        c = x.shape[-1]
        taps = weight.reshape(c, -1).t().contiguous()                 # (k*k, C)
        ctx.save_for_backward(x, taps, neighbours)
        ctx.has_bias = bias is not None
        return _dwconv_at_sites_op(x, neighbours, taps, bias)

    @staticmethod
    def backward(ctx, grad):
        x, taps, neighbours = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _dwconv_at_sites_op(grad, neighbours, taps.flip(0).contiguous(), None)
        if ctx.needs_input_grad[1]:
            ks = int(round(taps.shape[0] ** 0.5))
            grad_w = (_dwconv_at_sites_wgrad_op(x, neighbours, grad).t()
                      .reshape(x.shape[-1], 1, ks, ks).to(taps.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(grad.dtype)
        return grad_x, grad_w, grad_b, None


def dwconv_at_sites(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    neighbours: torch.Tensor) -> torch.Tensor:
    """A 'same' stride-1 depthwise conv evaluated at the sites, with autograd: (M, C).

    ``x``: (M, C) sites; ``weight``: (C, 1, k, k); ``neighbours``: ``neighbour_table`` of the
    sites. Accumulates in float32 (float64 for float64), returns ``x``'s dtype.
    """
    return SitesDepthwise.apply(x.contiguous(), weight, bias, neighbours)
