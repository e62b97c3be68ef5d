"""One FCMAE training step, optionally captured as a CUDA graph: what the benchmarks time.

``TrainStep(fcmae, optimizer, amp="bf16", cuda_graph=True)`` runs one training step (forward,
backward, optimizer step); with ``cuda_graph`` it captures the step as one CUDA graph after a
few warm-up steps and replays it for every later batch of the same shape: no Python and no
kernel-launch overhead per step. It works eager or on top of either kind of compilation
(``torch.compile(fcmae)``, ``compiled_regions.compile_regions``), and it is what
``fcmae_speed.py`` calls the "graph" modes. The FCMAE forward allows the capture because it
never reads a value back from the device (masks on the device keep ``int(L * (1 -
mask_ratio))`` cells, checked asynchronously) and has fixed shapes for a fixed batch size.

bf16 autocast is the advice on CUDA (``amp="bf16"``): the GPU's matmul units run 2x (or more)
faster than in fp32/TF32 and GRN's and LayerNorm's statistics stay in float32.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

AMP_DTYPES = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_capturable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Let ``optimizer.step()`` be captured in a CUDA graph (its step counters on the device).

    A learning rate given as a float is baked into the graph: to change it during training,
    build the optimizer with a tensor ``lr`` on the device and update it in place.
    """
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True
    return optimizer


class TrainStep:
    """One FCMAE training step: ``loss = step(imgs, mask)`` (forward, backward, optimizer step).

    ``model``: an FCMAE, or a compiled one; called as ``model(imgs, mask, return_pred=False)``
    (the step reads the loss only, so the full-shape prediction is not built).
    ``amp``: None or ``"bf16"`` (``"fp16"`` needs a GradScaler and is not supported here).
    ``cuda_graph``: on CUDA, run ``warmup`` eager steps on a side stream, then capture one step
    as a CUDA graph and replay it for every later call. Inputs are copied into static buffers
    (same shapes every call); the returned loss is the graph's own output tensor, overwritten
    by the next call (``.clone()`` it to keep it). ``mask=None`` draws the mask inside the
    step (inside the graph too: a fresh mask every replay).
    Without ``cuda_graph`` it is the plain step: ``zero_grad``, forward, backward, ``step``.
    Nothing in either reads a value back from the device.
    """

    def __init__(self, model: Callable, optimizer: torch.optim.Optimizer, *,
                 amp: str | None = None, cuda_graph: bool = False, warmup: int = 3):
        if amp not in AMP_DTYPES or amp == "fp16":
            raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
        self.model, self.optimizer = model, optimizer
        self.amp_dtype = AMP_DTYPES[amp]
        self.cuda_graph = bool(cuda_graph)
        self.warmup = max(int(warmup), 1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._done = 0
        self._static: dict = {}
        self._stream = None
        if self.cuda_graph:
            make_capturable(optimizer)

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # no weight-cast cache: inside a CUDA graph every replay must cast the current weights
        return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _forward_backward(self, imgs, mask):
        with self._autocast(imgs.device):
            loss = self.model(imgs, mask, return_pred=False)[0]
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.cuda_graph and imgs.device.type == "cuda"):
            self.optimizer.zero_grad(set_to_none=True)
            return self._forward_backward(imgs, mask)
        if self.graph is not None:
            return self._replay(imgs, mask)
        if self._stream is None:
            self._stream = torch.cuda.Stream(imgs.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(imgs.device))
        if self._done < self.warmup:  # warm-up (compilation, cuDNN/cuBLAS set-up) off the main stream
            with torch.cuda.stream(stream):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._forward_backward(imgs, mask)
            torch.cuda.current_stream(imgs.device).wait_stream(stream)
            self._done += 1
            return loss
        self._static = {"imgs": imgs.clone(), "mask": None if mask is None else mask.clone()}
        self.optimizer.zero_grad(set_to_none=True)  # grads are allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # (synchronises once, to capture)
            self._static["loss"] = self._forward_backward(self._static["imgs"], self._static["mask"])
        self.graph = graph
        graph.replay()  # capturing ran nothing: this is the step of this call
        return self._static["loss"]

    def _replay(self, imgs, mask):
        static = self._static
        if (mask is None) != (static["mask"] is None):
            raise ValueError("TrainStep was captured " + ("without" if static["mask"] is None else "with")
                             + " a mask; pass masks the same way every call")
        if imgs.shape != static["imgs"].shape or (mask is not None and mask.shape != static["mask"].shape):
            raise ValueError("a CUDA-graph TrainStep needs the same batch shape every call "
                             f"(captured {tuple(static['imgs'].shape)}); drop the last partial batch")
        if imgs is not static["imgs"]:
            static["imgs"].copy_(imgs, non_blocking=True)
        if mask is not None and mask is not static["mask"]:
            static["mask"].copy_(mask, non_blocking=True)
        self.graph.replay()
        return static["loss"]
