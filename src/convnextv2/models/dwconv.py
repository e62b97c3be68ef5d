"""The blocks' depthwise 7x7 convolution, with a fast weight gradient on the CPU.

oneDNN's depthwise weight-gradient kernel is 5-20x slower than its forward kernel for the same
work (atto at batch 32, 56x56 maps: 57 ms against 8 ms; 14x14: 13 against 1.5 ms). The same
numbers come from a forward depthwise conv (``depthwise_weight_grad``), so on the CPU, in eager
training, ``depthwise_conv`` runs the blocks' conv through an autograd function whose backward
uses it. Everywhere else (CUDA, torch.compile, inference, export, hooked modules) the module
itself runs. Used by the dense model's blocks, the masked-dense and sparse FCMAE encoders and
the FCMAE decoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import autocast_dtype, autocast_off, compiling, global_hooks, plain_math


def depthwise_weight_grad(grad_out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor
                          ) -> torch.Tensor:
    """Weight gradient of a stride-1 'same' depthwise conv: (C, 1, k, k).

    On the CPU, oneDNN's depthwise weight-gradient kernel is 5-20x slower than its forward
    kernel for the same work. The same numbers come from a forward depthwise conv: fold the
    batch into the channels, use the output gradient of each (sample, channel) as a kernel the
    size of the map, and sum the (k x k) outputs over the batch. 2-6x faster here. Elsewhere
    (cuDNN) and inside torch.compile, the library's own backward runs.
    """
    n, c, h, w = inp.shape
    k = weight.shape[-1]
    pad = k // 2
    if inp.device.type != "cpu" or compiling() or n * c * h * w == 0:
        return torch.ops.aten.convolution_backward(
            grad_out, inp, weight, None, (1, 1), (pad, pad), (1, 1), False, (0, 0), c,
            (False, True, False))[1]
    # input: all (sample, channel) planes as the channels of one image, channels-last memory
    planes = inp.permute(2, 3, 0, 1).reshape(1, h, w, n * c).permute(0, 3, 1, 2)
    kernels = grad_out.contiguous().view(n * c, 1, h, w)
    out = F.conv2d(planes, kernels, None, padding=pad, groups=n * c)     # (1, N*C, k, k)
    acc = torch.promote_types(out.dtype, torch.float32)  # float32 for half types, else as is
    return out.view(n, c, k, k).sum(0, dtype=acc).unsqueeze(1).to(weight.dtype)


class _DepthwiseCPU(torch.autograd.Function):
    """A 'same' stride-1 depthwise conv whose weight gradient uses ``depthwise_weight_grad``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        pad = weight.shape[-1] // 2
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=pad, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        pad = weight.shape[-1] // 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-1, -2), None, padding=pad, groups=x.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(grad, x, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b


def depthwise_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a depthwise 'same' conv (the blocks' 7x7); on the CPU in eager training
    with the fast weight gradient of ``depthwise_weight_grad``, elsewhere the module itself
    (also when anything hooks the module, or hooks every module, as activation analysis does)."""
    if (x.device.type != "cpu" or compiling() or not torch.is_grad_enabled() or plain_math()
            or global_hooks() or conv.weight.shape[0] != x.shape[1] or conv.groups != x.shape[1]
            or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros"
            or tuple(conv.padding) != (conv.weight.shape[-2] // 2, conv.weight.shape[-1] // 2)
            or conv._forward_hooks or conv._forward_pre_hooks):
        return conv(x)
    dtype = autocast_dtype(x)
    weight, bias = conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)
    with autocast_off(x):
        return _DepthwiseCPU.apply(x.to(dtype), weight, bias)
