"""The dense ConvNeXt V2 network (and the ConvNeXt V1 block for ablations).

Activations flow between blocks as NCHW tensors; each block works channels-last internally
(LayerNorm, the two Linear layers and GRN act on the last axis), which is how the paper writes
it and what makes the Linear layers plain matrix multiplies.

Speed: the forward passes put the input in ``torch.channels_last`` memory, so every map after
the stem is NHWC in memory; the NCHW <-> NHWC permutes are then free views, and the depthwise convolution runs
its channels-last kernel (2-4x faster on CPU, backward included). GRN and the second Linear run
as one batched matmul that also adds the skip connection (``grn_fused.grn_linear``); in inference on
CPU the first Linear and GELU run as one oneDNN call. Numerics equal the plain formulas up to
float rounding (tests/test_speed_paths.py checks this against a reference written out in full).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from timm.layers import DropPath

from .dwconv import depthwise_conv
from .grn import GRN
from .grn_fused import grn_linear
from .runtime import autocast_dtype, compiling, global_hooks, plain_math

LN_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = LN_EPS):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """dwconv 7x7 -> LN -> Linear(d, 4d) -> GELU -> GRN -> Linear(4d, d) -> residual.

    With ``use_grn=False`` and a ``layer_scale_init_value`` it is the ConvNeXt V1 block:
    no GRN, and a per-channel scale on the MLP output.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, use_grn: bool = True,
                 layer_scale_init_value: float | None = None):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim) if use_grn else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value:
            self.layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.layer_scale = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def mlp(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Everything after the depthwise conv, on a channels-last tensor (..., C).

        ``residual`` (same shape as the output) is added inside the last matmul.
        """
        x = self.norm(x)
        if self.fusable() and x.dim() >= 3:
            grn, fc2 = self.grn, self.pwconv2
            if not torch.is_grad_enabled() and _onednn_ok(x, self.pwconv1):
                x = torch.ops.mkldnn._linear_pointwise(
                    x, self.pwconv1.weight, self.pwconv1.bias, "gelu", [], "none")
                return grn_linear(x, grn.gamma, grn.beta, fc2.weight, fc2.bias, residual,
                                  eps=grn.eps)
            return grn_linear(self.pwconv1(x), grn.gamma, grn.beta, fc2.weight, fc2.bias,
                              residual, gelu=True, eps=grn.eps)
        x = self.act(self.pwconv1(x))
        if self.grn is not None:
            x = self.grn(x)
        x = self.pwconv2(x)
        if self.layer_scale is not None:
            x = x * self.layer_scale
        return x if residual is None else residual + x

    def fusable(self) -> bool:
        """Whether the MLP may run fused (``grn_fused.grn_linear``), which skips the calls of
        pwconv1, act, grn and pwconv2 as modules: only for GRN + exact GELU without layer scale,
        when nobody hooks those modules (activation analysis does), and when not exporting."""
        if (self.grn is None or self.layer_scale is not None or type(self.act) is not nn.GELU
                or self.act.approximate != "none" or plain_math() or global_hooks()):
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks
                       for m in (self.pwconv1, self.act, self.grn, self.pwconv2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op after our stem
        y = depthwise_conv(self.dwconv, x).permute(0, 2, 3, 1)
        if isinstance(self.drop_path, nn.Identity) or not self.training:
            return self.mlp(y, residual=x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.mlp(y).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


def _onednn_ok(x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether oneDNN's fused Linear+GELU can run on ``x`` (CPU inference, no autocast cast)."""
    return (_ONEDNN_LINEAR and x.device.type == "cpu" and x.is_contiguous() and not plain_math()
            and x.dtype == linear.weight.dtype == autocast_dtype(x)
            and x.dtype in (torch.float32, torch.bfloat16) and not compiling())


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """The input in channels-last memory (same values, same NCHW shape): see the module doc."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Stem(nn.Module):
    """Patchify convolution (kernel = stride) followed by a channel LayerNorm."""

    def __init__(self, in_chans: int, dim: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=stride, stride=stride)
        self.norm = LayerNorm2d(dim)

    def forward(self, x):
        return self.norm(self.conv(x))


class Downsample(nn.Module):
    """Channel LayerNorm then a 2x2 stride-2 convolution between stages."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = LayerNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x):
        return self.conv(self.norm(x))


GRAD_CHECKPOINTING = ("block", "stage")
"""What one recomputed unit spans: a block (and each downsampling on its own), or a whole
stage. Per block keeps one map per block for backward and recomputes one block at a time;
per stage keeps four maps in all and recomputes a whole stage at once."""


def check_granularity(granularity: str) -> str:
    if granularity not in GRAD_CHECKPOINTING:
        raise ValueError(f"gradient checkpointing granularity must be one of "
                         f"{', '.join(GRAD_CHECKPOINTING)}, got {granularity!r}")
    return granularity


def run_stage(mode: str | None, x, downsample: Callable | None, blocks: Sequence[Callable]):
    """``x`` through ``downsample`` (None: none) and then each of ``blocks`` (callables
    ``x -> x``), with gradient checkpointing ``mode`` (None, "block" or "stage").

    One function for the dense model, the sparse and the masked dense FCMAE encoders, so the
    three recompute the same units. A checkpointed unit keeps only its input for backward and
    runs again during backward (``torch.utils.checkpoint``, non-reentrant: works under
    torch.compile, with FSDP2 and with the custom autograd nodes of the fast paths; the RNG
    state is replayed, so stochastic depth drops the same samples). Without autograd (eval,
    ``torch.no_grad``) there is nothing to save and it runs plainly.
    """
    def run(x):
        if downsample is not None:
            x = downsample(x)
        for block in blocks:
            x = block(x)
        return x

    if mode is None or not torch.is_grad_enabled():
        return run(x)
    if mode == "stage":
        return _checkpoint(run, x)
    if downsample is not None:
        x = _checkpoint(downsample, x)
    for block in blocks:
        x = _checkpoint(block, x)
    return x


def _checkpoint(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)


class Stage(nn.Module):
    """Optional downsampling, then blocks. ``grad_checkpointing``: None, "block" or "stage"
    (set by ``ConvNeXtV2.set_grad_checkpointing``; read by every encoder that runs the stage)."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: Sequence[float],
                 downsample: bool, use_grn: bool, layer_scale_init_value: float | None):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(dim, drop_paths[i], use_grn, layer_scale_init_value) for i in range(depth)])
        self.grad_checkpointing: str | None = None

    def forward(self, x):
        if self.grad_checkpointing is None:  # module calls as always (hooks on ``blocks`` fire)
            return self.blocks(self.downsample(x))
        downsample = None if isinstance(self.downsample, nn.Identity) else self.downsample
        return run_stage(self.grad_checkpointing, x, downsample, list(self.blocks))


def set_stages_grad_checkpointing(stages, enable: bool, granularity: str) -> None:
    """The ``set_grad_checkpointing`` of every module that runs ``stages``."""
    mode = check_granularity(granularity) if enable else None
    for stage in stages:
        stage.grad_checkpointing = mode


class Head(nn.Module):
    """Global average pool, LayerNorm, Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2 image classifier.

    Args:
        in_chans: input channels (any count).
        num_classes: classifier outputs; 0 keeps the pooled, normalised features.
        depths, dims: blocks and widths of the four stages.
        drop_path_rate: stochastic depth, rising linearly across all blocks.
        head_init_scale: multiplies the initial head weight and bias (0.001 for fine-tuning).
        stem_stride: stem kernel = stride (4 as in the paper; 1 or 2 suit 28-32 px images).
        use_grn, layer_scale_init_value: ``False, 1e-6`` gives the ConvNeXt V1 block.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path_rate: float = 0.0, head_init_scale: float = 1.0, stem_stride: int = 4,
                 use_grn: bool = True, layer_scale_init_value: float | None = None):
        super().__init__()
        depths, dims = [int(d) for d in depths], [int(d) for d in dims]
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims need 4 entries each, got {depths} and {dims}")
        if in_chans < 1 or stem_stride < 1:
            raise ValueError(f"in_chans and stem_stride must be >= 1, got {in_chans}, {stem_stride}")
        self.config = dict(in_chans=in_chans, num_classes=num_classes, depths=depths, dims=dims,
                           drop_path_rate=drop_path_rate, head_init_scale=head_init_scale,
                           stem_stride=stem_stride, use_grn=use_grn,
                           layer_scale_init_value=layer_scale_init_value)
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.stem = Stem(in_chans, dims[0], stem_stride)
        n_blocks = sum(depths)  # python floats, so models can be built on the meta device
        rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.stages = nn.ModuleList()
        start = 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            self.stages.append(Stage(dims[max(i - 1, 0)], dim, depth, rates[start:start + depth],
                                     downsample=i > 0, use_grn=use_grn,
                                     layer_scale_init_value=layer_scale_init_value))
            start += depth
        self.head = Head(dims[-1], num_classes)
        self.feature_info = [
            dict(num_chs=dim, reduction=stem_stride * 2 ** i, module=f"stages.{i}")
            for i, dim in enumerate(dims)]
        self.apply(init_weights)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    @property
    def total_stride(self) -> int:
        """Input pixels per cell of the final feature map (32 for the standard stem)."""
        return self.config["stem_stride"] * 8

    def set_grad_checkpointing(self, enable: bool = True, granularity: str = "block") -> None:
        """Recompute activations in backward instead of keeping them (timm's method name).

        ``granularity``: "block" (each block and each downsampling is a unit; the map between
        units is kept) or "stage" (each stage is one unit; least kept, largest recompute).
        Same loss and gradients; one extra forward of the recomputed part per step. Applies
        to this classifier, its ``FeatureExtractor``, and the FCMAE encoders built on it.
        """
        set_stages_grad_checkpointing(self.stages, enable, granularity)

    @property
    def grad_checkpointing(self) -> str | None:
        """The granularity in use, None when off."""
        return self.stages[0].grad_checkpointing

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(_nhwc(x))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] = (0, 1, 2, 3)
                              ) -> list[torch.Tensor]:
        """Output maps of the requested stages (strides ``feature_info[i]['reduction']``)."""
        wanted = {i % 4 for i in indices}
        out = []
        x = self.stem(_nhwc(x))
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in wanted:
                out.append(x)
            if i >= max(wanted):
                break
        return out

    def reset_classifier(self, num_classes: int, init_std: float = 0.02) -> None:
        """A fresh classifier for a new label set (fine-tuning, linear probing): weights drawn
        from a truncated normal of std ``init_std`` (cut at +-2, as ``init_weights``), zero
        bias; ``num_classes`` 0 leaves the pooled features. A Linear already of the right size
        is re-initialised in place; a new one is made on the head's device and dtype."""
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        if num_classes <= 0:
            self.head.fc = nn.Identity()
            return
        fc = self.head.fc
        if not (isinstance(fc, nn.Linear) and fc.out_features == num_classes):
            like = self.head.norm.weight
            fc = self.head.fc = nn.Linear(self.num_features, num_classes, device=like.device,
                                          dtype=like.dtype)
        with torch.no_grad():
            nn.init.trunc_normal_(fc.weight, std=init_std, a=-2.0, b=2.0)
            nn.init.zeros_(fc.bias)


class FeatureExtractor(nn.Module):
    """Backbone for detection and segmentation: returns the maps of ``out_indices``."""

    def __init__(self, model: ConvNeXtV2, out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        self.out_indices = tuple(i % 4 for i in out_indices)
        self.stem, self.stages = model.stem, model.stages[:max(self.out_indices) + 1]
        self.config = model.config
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    def set_grad_checkpointing(self, enable: bool = True, granularity: str = "block") -> None:
        """As ``ConvNeXtV2.set_grad_checkpointing`` (the stages are the model's own)."""
        set_stages_grad_checkpointing(self.stages, enable, granularity)

    @property
    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    @property
    def reductions(self) -> list[int]:
        return [f["reduction"] for f in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = self.stem(_nhwc(x))
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                out.append(x)
        return out


def apply_grad_checkpointing(module: nn.Module, granularity: str | None) -> int:
    """``set_grad_checkpointing`` on ``module``, or on the outermost submodules that have it
    (a detector's or segmenter's ConvNeXt backbone): what ``--grad-checkpointing`` does to
    whatever a recipe trains. ``granularity`` None switches it off. Returns how many modules
    were set (0: nothing in ``module`` can checkpoint)."""
    if hasattr(module, "set_grad_checkpointing"):
        module.set_grad_checkpointing(granularity is not None, granularity or "block")
        return 1
    return sum(apply_grad_checkpointing(child, granularity) for child in module.children())


def init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02, cut at +-2 absolute as in the reference) and zero bias."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
