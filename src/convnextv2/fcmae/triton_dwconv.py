"""The blocks' depthwise 7x7 evaluated at the visible sites only: Triton kernels.

The default sparse depthwise (``sparse._SubmanifoldDepthwise``, ``dwconv="grid"``) scatters the
sites into a zero-filled grid of the whole stage, runs the library's dense depthwise convolution
(cuDNN, oneDNN) on it and keeps the outputs at the sites: with 60% of the image masked, 60% of
that convolution's work is thrown away. On the GPU it is the largest single item of the sparse
step's kernel time. These kernels (``dwconv="triton"``) compute the sites' outputs only, reading
each site's k*k neighbours from the same zero-filled grid (masked neighbours read as zero,
which is the submanifold rule):

- forward: ``y[s, c] = b[c] + sum_t w[c, t] * grid[p(s) + o(t), c]`` over the taps t;
- input gradient: the same kernel on the zero-filled grid of the output gradient, with the
  kernel flipped (a 'same', stride-1 convolution's adjoint is the flipped convolution);
- weight gradient: ``gw[c, t] = sum_s g[s, c] * grid[p(s) + o(t), c]``, reduced in float32
  per block of sites into a partial-sum buffer that is then summed: deterministic, no atomics.

Sites are in Z order inside each visible patch, so a block of consecutive sites is a compact
square of the map and neighbouring reads hit the cache. Accumulation is in float32 whatever the
input dtype (bf16 under autocast), as in cuDNN; in float64 for float64 inputs (the exactness
tests).

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


def _block_c(c: int) -> int:
    """Channels per program: a power of two, at most 64 (register tiles of 64 x 64 floats)."""
    return min(64, triton.next_power_of_2(c))


if triton is not None:

    @triton.jit
    def _site_coords(index_ptr, rm, m_ok, H, W):
        """Flat grid positions of the sites ``rm`` and their (row, column) in the map."""
        f = tl.load(index_ptr + rm, mask=m_ok, other=0).to(tl.int32)
        rest = f % (H * W)
        row = rest // W
        return f, row, rest - row * W

    @triton.jit
    def _dwconv_sites_kernel(grid_ptr, index_ptr, w_ptr, b_ptr, out_ptr, M, H, W, C,
                             KS: tl.constexpr, HAS_BIAS: tl.constexpr, F64: tl.constexpr,
                             BLOCK: tl.constexpr, BLOCK_CH: tl.constexpr):
        # grid: (N*H*W, C) zero-filled map; index: (M,) flat positions of the sites;
        # w: (KS*KS, C) taps; out: (M, C)
        rm = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rc = tl.program_id(1) * BLOCK_CH + tl.arange(0, BLOCK_CH)
        m_ok = rm < M
        c_ok = rc < C
        f, row, col = _site_coords(index_ptr, rm, m_ok, H, W)
        ACC = tl.float64 if F64 else tl.float32
        acc = tl.zeros((BLOCK, BLOCK_CH), dtype=ACC)
        PAD: tl.constexpr = KS // 2
        for ky in tl.static_range(KS):
            rr = row + (ky - PAD)
            row_ok = m_ok & (rr >= 0) & (rr < H)
            for kx in tl.static_range(KS):
                cc = col + (kx - PAD)
                ok = row_ok & (cc >= 0) & (cc < W)
                src = (f + ((ky - PAD) * W + (kx - PAD))).to(tl.int64)
                v = tl.load(grid_ptr + src[:, None] * C + rc[None, :],
                            mask=ok[:, None] & c_ok[None, :], other=0.0)
                wt = tl.load(w_ptr + (ky * KS + kx) * C + rc, mask=c_ok, other=0.0)
                acc += v.to(ACC) * wt.to(ACC)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rc, mask=c_ok, other=0.0).to(ACC)[None, :]
        dst = rm.to(tl.int64)[:, None] * C + rc[None, :]
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _dwconv_sites_wgrad_kernel(grid_ptr, index_ptr, g_ptr, part_ptr, M, H, W, C,
                                   KS: tl.constexpr, F64: tl.constexpr,
                                   BLOCK: tl.constexpr, BLOCK_CH: tl.constexpr):
        # part: (num_programs_m, KS*KS, C) partial sums of this program's sites (float32;
        # float64 for float64 inputs)
        pid_m = tl.program_id(0)
        rm = pid_m * BLOCK + tl.arange(0, BLOCK)
        rc = tl.program_id(1) * BLOCK_CH + tl.arange(0, BLOCK_CH)
        m_ok = rm < M
        c_ok = rc < C
        f, row, col = _site_coords(index_ptr, rm, m_ok, H, W)
        ACC = tl.float64 if F64 else tl.float32
        g = tl.load(g_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :],
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        PAD: tl.constexpr = KS // 2
        for ky in tl.static_range(KS):
            rr = row + (ky - PAD)
            row_ok = m_ok & (rr >= 0) & (rr < H)
            for kx in tl.static_range(KS):
                cc = col + (kx - PAD)
                ok = row_ok & (cc >= 0) & (cc < W)
                src = (f + ((ky - PAD) * W + (kx - PAD))).to(tl.int64)
                v = tl.load(grid_ptr + src[:, None] * C + rc[None, :],
                            mask=ok[:, None] & c_ok[None, :], other=0.0)
                s = tl.sum(v.to(ACC) * g, axis=0)
                tl.store(part_ptr + (pid_m * (KS * KS) + ky * KS + kx) * C + rc, s, mask=c_ok)

    @triton_op("convnextv2::dwconv_at_sites", mutates_args={})
    def _dwconv_at_sites_op(grid: torch.Tensor, flat_index: torch.Tensor, taps: torch.Tensor,
                            bias: torch.Tensor | None, ks: int, h: int, w: int) -> torch.Tensor:
        m, c = flat_index.shape[0], grid.shape[-1]
        out = grid.new_empty(m, c)
        if m == 0:
            return out
        bc = _block_c(c)
        launch = (triton.cdiv(m, BLOCK_M), triton.cdiv(c, bc))
        wrap_triton(_dwconv_sites_kernel)[launch](
            grid, flat_index, taps, bias if bias is not None else taps, out, m, h, w, c,
            KS=ks, HAS_BIAS=bias is not None, F64=grid.dtype == torch.float64,
            BLOCK=BLOCK_M, BLOCK_CH=bc)
        return out

    @triton_op("convnextv2::dwconv_at_sites_wgrad", mutates_args={})
    def _dwconv_at_sites_wgrad_op(grid: torch.Tensor, flat_index: torch.Tensor,
                                  grad: torch.Tensor, ks: int, h: int, w: int) -> torch.Tensor:
        m, c = flat_index.shape[0], grid.shape[-1]
        programs = triton.cdiv(m, BLOCK_M_WGRAD)
        acc = torch.float64 if grid.dtype == torch.float64 else torch.float32
        part = torch.zeros(max(programs, 1), ks * ks, c, device=grid.device, dtype=acc)
        if m:
            bc = _block_c(c)
            wrap_triton(_dwconv_sites_wgrad_kernel)[(programs, triton.cdiv(c, bc))](
                grid, flat_index, grad, part, m, h, w, c,
                KS=ks, F64=grid.dtype == torch.float64, BLOCK=BLOCK_M_WGRAD, BLOCK_CH=bc)
        return part.sum(0)


def dwconv_at_sites(grid: torch.Tensor, flat_index: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs of a 'same' stride-1 depthwise conv at the sites ``flat_index``: (M, C).

    ``grid``: (N, H, W, C) contiguous (channels-last), zero wherever there is no site;
    ``flat_index``: (M,) positions in the flattened (N*H*W) map; ``weight``: (C, 1, k, k).
    Accumulates in float32, returns ``grid``'s dtype.
    """
    n, h, w, c = grid.shape
    taps = weight.reshape(c, -1).t().contiguous()
    return _dwconv_at_sites_op(grid.reshape(n * h * w, c), flat_index, taps,
                               bias.contiguous() if bias is not None else None,
                               weight.shape[-1], h, w)


def dwconv_at_sites_weight_grad(grid: torch.Tensor, flat_index: torch.Tensor,
                                grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gradient of ``dwconv_at_sites`` w.r.t. ``weight`` for the output gradient ``grad``
    (M, C): (C, 1, k, k) in ``weight``'s dtype (summed in float32)."""
    n, h, w, c = grid.shape
    ks = weight.shape[-1]
    taps = _dwconv_at_sites_wgrad_op(grid.reshape(n * h * w, c), flat_index,
                                     grad.contiguous(), ks, h, w)
    return taps.t().reshape(c, 1, ks, ks).to(weight.dtype)
