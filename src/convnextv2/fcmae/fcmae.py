"""FCMAE: fully convolutional masked autoencoder pretraining for ConvNeXt V2 (docs/design.md).

``FCMAE.encoder`` is a plain dense ``ConvNeXtV2``: pretraining trains its own parameters, so
``fcmae.encoder.state_dict()`` loads into an ordinary model with no conversion. The encoder runs
either truly sparse (``backend="sparse"``, default: only visible sites are computed) or as
masked dense convolution (``backend="dense"``, the reference that the paper trained with).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.dwconv import depthwise_conv
from ..models.grn_fused import grn_rows
from ..models.model import Block, ConvNeXtV2, init_weights
from ..models.registry import create_model
from ..models.runtime import compiled_region, compiling
from .masked_dense import masked_dense_forward_features
from .masking import (check_input, check_mask, count_visible, mask_order, masked_rows,
                      num_visible, random_mask)
from .masking import keyed_mask  # noqa: F401  (importable from here as before)
from .sparse import DWCONV_KERNELS, patchify, sparse_forward_features

BACKENDS = ("sparse", "dense")
NORM_PIX_EPS = 1e-6


class FCMAE(nn.Module):
    """Masked image modelling with a ConvNeXt V2 encoder and a small ConvNeXt V2 decoder.

    Args:
        encoder: a model name (built with ``num_classes=0`` plus ``encoder_kwargs``) or a
            ``ConvNeXtV2`` instance, used as is (its head stays unused).
        mask_ratio: fraction of patches removed when ``forward`` draws the mask.
        decoder_depth, decoder_embed_dim: decoder blocks and their width.
        norm_pix_loss: regress each patch normalised by its own mean and (unbiased) variance.
        backend: ``"sparse"`` or ``"dense"`` (masked dense convolution).
        sparse_dwconv: the sparse backend's depthwise 7x7: ``"grid"`` (the library's dense
            kernel on a zero-filled grid, outputs kept at visible sites) or ``"triton"``
            (Triton kernels that compute visible sites only; CUDA, else "grid"). Same numbers.
        masked_decoder: in a training forward (``model.train()``, autograd on), run the part of
            the last decoder block after GRN's statistics (GRN, second Linear, skip) and the
            prediction layer only at masked cells, the only cells the loss reads. Same loss
            and gradients up to float rounding; the returned ``pred`` is then zero at visible
            cells. Evaluation (``eval()`` or ``torch.no_grad()``) always predicts every cell.

    Masks and host syncs: every sample keeps the same number of cells. A mask on the CPU is
    counted on the host (free; uneven masks raise for the sparse backend). A mask on an
    accelerator, and any mask inside torch.compile, is taken to keep
    ``int(L * (1 - mask_ratio))`` cells, checked by an asynchronous device assert, so the
    training step never waits for the device.

    Speed: ``torch.compile(fcmae, fullgraph=True)`` compiles forward and backward as one graph
    (either backend). The repeated pieces (an encoder block, the training decoder and loss) are
    regions that may be compiled one by one (``runtime.compiled_region``), and nothing in a
    training step waits for the device, so the whole step can be captured as a CUDA graph
    (``benchmarks/compiled_regions.py``, ``benchmarks/train_step.py``, docs/benchmarks.md).
    """

    def __init__(self, encoder: str | ConvNeXtV2, *, mask_ratio: float = 0.6,
                 decoder_depth: int = 1, decoder_embed_dim: int = 512, norm_pix_loss: bool = True,
                 backend: str = "sparse", encoder_kwargs: dict | None = None,
                 masked_decoder: bool = True, sparse_dwconv: str = "grid"):
        super().__init__()
        if isinstance(encoder, str):
            encoder = create_model(encoder, **{"num_classes": 0, **(encoder_kwargs or {})})
        elif encoder_kwargs:
            raise ValueError("encoder_kwargs only apply when the encoder is given by name")
        if not isinstance(encoder, ConvNeXtV2):
            raise TypeError(f"encoder must be a model name or a ConvNeXtV2, got {type(encoder).__name__}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.masked_decoder = bool(masked_decoder)
        self.patch_size = encoder.total_stride
        self.in_chans = encoder.config["in_chans"]
        self.set_backend(backend, sparse_dwconv)

        p = self.patch_size
        self.proj = nn.Conv2d(encoder.num_features, decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_embed_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_embed_dim, p * p * self.in_chans, kernel_size=1)
        for module in (self.proj, self.decoder, self.pred):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- configuration -------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True, granularity: str = "block") -> None:
        """Gradient checkpointing of the encoder (either backend; see
        ``ConvNeXtV2.set_grad_checkpointing``). The decoder works on the patch grid (7x7 at
        224 px) and keeps little, so it runs as before."""
        self.encoder.set_grad_checkpointing(enable, granularity)

    def set_backend(self, backend: str, sparse_dwconv: str | None = None) -> "FCMAE":
        """Switch the encoder's backend (and the sparse depthwise kernel, when given)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if sparse_dwconv is not None and sparse_dwconv not in DWCONV_KERNELS:
            raise ValueError(f"sparse_dwconv must be one of {DWCONV_KERNELS}, got {sparse_dwconv!r}")
        self.backend = backend
        if sparse_dwconv is not None:
            self.sparse_dwconv = sparse_dwconv
        return self

    def grid_size(self, imgs: torch.Tensor) -> tuple[int, int]:
        p = self.patch_size
        h, w = imgs.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {p}")
        return h // p, w // p

    def random_mask(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A mask for ``imgs`` with this model's ratio, on the images' device (drawn there with
        that device's default RNG unless ``generator``)."""
        return random_mask(imgs.shape[0], self.grid_size(imgs), self.mask_ratio,
                           generator=generator, device=imgs.device)

    def visible_count(self, mask: torch.Tensor) -> int | None:
        """Cells each sample of ``mask`` keeps, known without waiting for the device.

        A CPU mask (outside torch.compile) is counted on the host: ``None`` when the counts
        differ between samples (only the dense backend accepts that; the sparse backend
        raises). Any other mask keeps ``int(L * (1 - mask_ratio))`` cells by contract
        (``check_mask`` asserts it asynchronously).
        """
        if mask.device.type == "cpu" and not compiling():
            try:
                return count_visible(mask)
            except ValueError:
                if self.backend == "sparse":
                    raise
                return None
        return num_visible(mask.shape[1], self.mask_ratio)

    # -- patches ---------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C); patches row-major, inside a patch (row, column, channel)."""
        self.grid_size(imgs)  # checks that the image is a whole number of patches
        return patchify(imgs, self.patch_size)

    def patches_at(self, imgs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``patchify(imgs)`` rows at the flat cell indices ``rows`` (into N*L): (len, p*p*C).

        Patchify everything, then take the rows: on the CPU that is 3x faster than indexing the
        six-axis view of the image at the cells directly (5.5 vs 16.5 ms for 960 of 1568
        224-px patches)."""
        patches = self.patchify(imgs)
        return patches.reshape(-1, patches.shape[-1]).index_select(0, rows)

    def unpatchify(self, x: torch.Tensor, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); ``grid_hw`` = (H/p, W/p), square when omitted."""
        p = self.patch_size
        n, cells, d = x.shape
        c = d // (p * p)
        if c * p * p != d:
            raise ValueError(f"last axis {d} is not a multiple of p*p = {p * p}")
        if grid_hw is None:
            side = int(round(cells ** 0.5))
            if side * side != cells:
                raise ValueError(f"{cells} patches do not form a square grid; pass grid_hw")
            grid_hw = (side, side)
        hp, wp = grid_hw
        if hp * wp != cells:
            raise ValueError(f"grid {hp}x{wp} does not hold {cells} patches")
        x = x.reshape(n, hp, wp, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, hp * p, wp * p)

    # -- the three parts: encoder, decoder, loss ---------------------------------------------
    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_pred: bool = True):
        """Returns ``(loss, pred, mask)``; the mask is drawn at random when not given.

        No device-to-host sync for masks on the images' device (see the class notes); with
        ``masked_decoder`` in training, ``pred`` holds predictions at masked cells only.
        ``return_pred=False`` (training loops that read only the loss): ``pred`` is None, and
        where the decoder ran at masked cells only its full-shape, zero-filled copy is never
        built (a 1568 x 3072 buffer at batch 32, 224 px: 8.6 ms of a 1.1 s CPU step).
        """
        if mask is None:
            mask = self.random_mask(imgs)
        rows_only = self._rows_only()
        kp, order = self._visible_cells(imgs, mask, counted=rows_only)
        latent = self._encode(imgs, mask, kp, order)
        if rows_only and kp is not None and kp < mask.shape[1]:  # decoder and loss at masked cells
            tail = compiled_region(self, "masked_tail", FCMAE.forward_masked_tail)
            loss, pred = tail(self, imgs, latent, mask, masked_rows(order, kp), return_pred)
            return loss, pred, mask
        pred = self.forward_decoder(latent, mask)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, (pred if return_pred else None), mask

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, d3, H/p, W/p) features of the visible cells; masked cells are exactly zero."""
        return self._encode(imgs, mask, *self._visible_cells(imgs, mask))

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fill masked cells with the mask token, decode, predict pixels: (N, L, p*p*C).

        Runs channels-last: the 1x1 convolutions become plain matrix multiplies, the depthwise
        conv of the blocks is much faster in channels-last memory on CPU, and the prediction
        comes out in (N, L, p*p*C) order without a final transpose.
        """
        n, _, hp, wp = latent.shape
        x = self.decoder(self._decoder_input(latent, mask))
        pred = F.linear(x.permute(0, 2, 3, 1), self.pred.weight.flatten(1), self.pred.bias)
        return pred.reshape(n, hp * wp, -1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE against the (normalised) pixels, averaged over masked patches."""
        diff = pred.float() - self._loss_target(self.patchify(imgs))
        loss = (diff * diff).mean(dim=-1)
        mask = mask.to(loss.dtype)
        return (loss * mask).sum() / mask.sum()

    # -- what the three parts share ----------------------------------------------------------
    def _visible_cells(self, imgs: torch.Tensor, mask: torch.Tensor, counted: bool = False):
        """``(K, mask_order(mask))`` for the sparse backend, or when ``counted`` (the decoder at
        masked cells needs them), else ``(None, None)``; K is the cells every sample keeps.
        Checks images and mask first: at once on the CPU, asynchronously on a device."""
        check_input(self.encoder, imgs, mask)
        kp = self.visible_count(mask) if (self.backend == "sparse" or counted) else None
        if kp is None:
            return None, None
        if mask.device.type != "cpu" or compiling():
            check_mask(mask, kp)  # asynchronous; CPU masks were counted on the host
        return kp, mask_order(mask)

    def _encode(self, imgs: torch.Tensor, mask: torch.Tensor, kp: int | None,
                order: torch.Tensor | None) -> torch.Tensor:
        """The encoder on the backend in use, given ``_visible_cells``' answer."""
        if self.backend == "sparse":
            return sparse_forward_features(self.encoder, imgs, mask, kp, order=order, check=False,
                                           dwconv=self.sparse_dwconv)
        return masked_dense_forward_features(self.encoder, imgs, mask)

    def _decoder_input(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's map projected to the decoder's width with the mask token at masked
        cells: (N, D, H/p, W/p), an NCHW view of channels-last memory."""
        n, _, hp, wp = latent.shape
        x = F.linear(latent.permute(0, 2, 3, 1), self.proj.weight.flatten(1), self.proj.bias)
        m = mask.reshape(n, hp, wp, 1).to(x.dtype)
        x = x * (1 - m) + self.mask_token.reshape(1, 1, 1, -1).to(x.dtype) * m
        return x.permute(0, 3, 1, 2)

    def _loss_target(self, patches: torch.Tensor) -> torch.Tensor:
        """What the decoder regresses for ``patches`` (..., p*p*C), in float32 and without
        gradient: the pixels, or with ``norm_pix_loss`` each patch normalised by its own mean
        and unbiased variance, ``(t - mean) / sqrt(var + NORM_PIX_EPS)``."""
        with torch.no_grad():
            target = patches.float()
            if self.norm_pix_loss:  # unbiased variance, as torch.var (written out: faster on CPU)
                target = target - target.mean(dim=-1, keepdim=True)
                var = (target * target).sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)
                target.mul_((var + NORM_PIX_EPS).rsqrt_())
        return target

    # -- training: decoder output and loss at masked cells only ----------------------------
    def _rows_only(self) -> bool:
        return (self.masked_decoder and self.training and torch.is_grad_enabled()
                and len(self.decoder) > 0 and self.decoder[-1].fusable())

    def forward_masked_tail(self, imgs, latent, mask, rows, return_pred: bool = True):
        """Decoder, prediction and loss at the masked cells ``rows`` (``masking.masked_rows``);
        the full-shape ``pred`` (zero at visible cells), or None. One function, so that it
        compiles as one region (``runtime.compiled_region``, ``"masked_tail"``)."""
        n, cells = mask.shape
        pred_rows = self.forward_decoder_rows(latent, mask, rows)
        loss = self.forward_loss_rows(imgs, pred_rows, rows)
        if not return_pred:
            return loss, None
        pred = pred_rows.new_zeros(n * cells, pred_rows.shape[-1]).index_copy_(0, rows, pred_rows)
        return loss, pred.view(n, cells, -1)

    def forward_decoder_rows(self, latent: torch.Tensor, mask: torch.Tensor,
                             rows: torch.Tensor) -> torch.Tensor:
        """``forward_decoder`` at the cells ``rows`` only (flat indices into N*L, the same
        number per sample, grouped by sample): (len(rows), p*p*C).

        Every cell is still decoded up to the last block's GRN statistics (its depthwise conv
        needs all neighbours and GRN's norm all cells); GRN's output, the second Linear, the
        skip connection and the prediction layer run at ``rows`` only.
        """
        x = self._decoder_input(latent, mask)
        for block in self.decoder[:-1]:
            x = block(x)
        out = _block_rows(self.decoder[-1], x, rows)
        return F.linear(out, self.pred.weight.flatten(1), self.pred.bias)

    def forward_loss_rows(self, imgs: torch.Tensor, pred_rows: torch.Tensor,
                          rows: torch.Tensor) -> torch.Tensor:
        """``forward_loss`` when ``pred_rows`` are the predictions at exactly the masked cells
        ``rows``: the mean of their per-patch errors."""
        target = self._loss_target(self.patches_at(imgs, rows))
        # every row has the same p*p*C values: the mean of the per-patch means is the mean
        return F.mse_loss(pred_rows.float(), target)

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, mask_ratio={self.mask_ratio}, "
                f"norm_pix_loss={self.norm_pix_loss}, backend={self.backend!r}, "
                f"masked_decoder={self.masked_decoder}")


def _block_rows(block: Block, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``block(x)`` at the cells ``rows`` (flat into N*H*W): (len(rows), C), channels-last rows.

    For a block with GRN + exact GELU and no hooks (``Block.fusable``), as the decoder's.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    n, c = x.shape[:2]
    y = block.norm(depthwise_conv(block.dwconv, x).permute(0, 2, 3, 1))
    h = grn_rows(block.pwconv1(y), block.grn.gamma, block.grn.beta, rows, gelu=True,
                 eps=block.grn.eps)
    out = F.linear(h, block.pwconv2.weight, block.pwconv2.bias)      # (N, M, C)
    skip = x.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, rows)
    if not isinstance(block.drop_path, nn.Identity) and block.training:
        out = block.drop_path(out)                                   # one draw per sample
    return skip + out.reshape(-1, c)
