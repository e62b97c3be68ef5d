"""FCMAE: fully convolutional masked autoencoder pretraining for ConvNeXt V2 (SPEC section 2).

``FCMAE.encoder`` is a plain dense ``ConvNeXtV2``: pretraining trains its own parameters, so
``fcmae.encoder.state_dict()`` loads into an ordinary model with no conversion. The encoder runs
either truly sparse (``backend="sparse"``, default: only visible sites are computed) or as
masked dense convolution (``backend="dense"``, the reference that the paper trained with).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masked_dense import masked_dense_forward_features
from .masking import keyed_mask, random_mask  # noqa: F401  (public mask functions)
from ..models.model import Block, ConvNeXtV2, init_weights
from ..models.registry import create_model
from .sparse import check_input, sparse_forward_features

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
    """

    def __init__(self, encoder: str | ConvNeXtV2, *, mask_ratio: float = 0.6,
                 decoder_depth: int = 1, decoder_embed_dim: int = 512, norm_pix_loss: bool = True,
                 backend: str = "sparse", encoder_kwargs: dict | None = None):
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
        self.patch_size = encoder.total_stride
        self.in_chans = encoder.config["in_chans"]
        self.set_backend(backend)

        p = self.patch_size
        self.proj = nn.Conv2d(encoder.num_features, decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_embed_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_embed_dim, p * p * self.in_chans, kernel_size=1)
        for module in (self.proj, self.decoder, self.pred):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- configuration -------------------------------------------------------------------
    def set_backend(self, backend: str) -> "FCMAE":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        return self

    def grid_size(self, imgs: torch.Tensor) -> tuple[int, int]:
        p = self.patch_size
        h, w = imgs.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {p}")
        return h // p, w // p

    def random_mask(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A mask for ``imgs`` with this model's ratio (global RNG unless ``generator``)."""
        return random_mask(imgs.shape[0], self.grid_size(imgs), self.mask_ratio,
                           generator=generator, device=imgs.device)

    # -- patches ---------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C); patches row-major, inside a patch (row, column, channel)."""
        p = self.patch_size
        n, c = imgs.shape[:2]
        hp, wp = self.grid_size(imgs)
        x = imgs.permute(0, 2, 3, 1).contiguous()  # NHWC first: two cheap copies beat one slow
        x = x.view(n, hp, p, wp, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, hp * wp, p * p * c)

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

    # -- the three parts -------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, d3, H/p, W/p) features of the visible cells; masked cells are exactly zero."""
        if self.backend == "sparse":
            return sparse_forward_features(self.encoder, imgs, mask)
        return masked_dense_forward_features(self.encoder, imgs, mask)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fill masked cells with the mask token, decode, predict pixels: (N, L, p*p*C).

        Runs channels-last: the 1x1 convolutions become plain matrix multiplies, the depthwise
        conv of the blocks is much faster in channels-last memory on CPU, and the prediction
        comes out in (N, L, p*p*C) order without a final transpose.
        """
        n, _, hp, wp = latent.shape
        x = F.linear(latent.permute(0, 2, 3, 1), self.proj.weight.flatten(1), self.proj.bias)
        m = mask.reshape(n, hp, wp, 1).to(x.dtype)
        x = x * (1 - m) + self.mask_token.reshape(1, 1, 1, -1).to(x.dtype) * m
        x = self.decoder(x.permute(0, 3, 1, 2))  # NCHW view of channels-last memory
        pred = F.linear(x.permute(0, 2, 3, 1), self.pred.weight.flatten(1), self.pred.bias)
        return pred.reshape(n, hp * wp, -1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE against the (normalised) pixels, averaged over masked patches."""
        with torch.no_grad():
            target = self.patchify(imgs).float()
            if self.norm_pix_loss:  # unbiased variance, as torch.var (written out: faster on CPU)
                target = target - target.mean(dim=-1, keepdim=True)
                var = (target * target).sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)
                target.mul_((var + NORM_PIX_EPS).rsqrt_())
        diff = pred.float() - target
        loss = (diff * diff).mean(dim=-1)
        mask = mask.to(loss.dtype)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None):
        """Returns ``(loss, pred, mask)``; the mask is drawn at random when not given."""
        if mask is None:
            mask = self.random_mask(imgs)
        check_input(self.encoder, imgs, mask)
        latent = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(latent, mask)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, mask_ratio={self.mask_ratio}, "
                f"norm_pix_loss={self.norm_pix_loss}, backend={self.backend!r}")
