"""Fast FCMAE training steps: torch.compile (whole model or per block) and CUDA graphs.

The FCMAE forward has no device-to-host sync (masks on the device keep
``int(L * (1 - mask_ratio))`` cells, checked asynchronously) and fixed shapes for a fixed batch
size, so it compiles as one graph and can be captured in a CUDA graph. Three ways, from the
simplest:

``torch.compile(fcmae, fullgraph=True)``
    The whole forward (encoder, decoder, loss) as one graph, backward included (AOT
    autograd); works for both backends, on CPU and CUDA. ``mode="reduce-overhead"`` adds
    CUDA graphs (forward and backward; the optimizer step stays eager). Compiling a base or
    large model this way takes minutes on the first step.

``compile_regions(fcmae)``
    Compiles the repeated pieces instead (one encoder block of either backend, and the
    decoder + loss), in place. Blocks of the same shape share one compiled graph, so compile
    time is a few graphs per model instead of one graph of every block; the per-block glue
    (stem, downsampling, sparse layout) stays eager. Meant to be combined with ``TrainStep``'s
    CUDA graph, which removes what host overhead that glue has.

``TrainStep(fcmae, optimizer, amp="bf16", cuda_graph=True)``
    One training step (forward, backward, optimizer step) captured as one CUDA graph after a
    few warm-up steps and replayed for every later batch of the same shape: no Python, no
    kernel-launch overhead per step. Works eager or on top of either kind of compilation.
    What the benchmark (``benchmarks/fcmae_speed.py``) calls the "graph" modes.

bf16 autocast is the advice on CUDA (``amp="bf16"``): the GPU's matmul units run 2x (or more)
faster than in fp32/TF32 and GRN's and LayerNorm's statistics stay in float32.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .fcmae import FCMAE
from .masked_dense import masked_block
from .sparse import sparse_block

AMP_DTYPES = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


REGIONS = ("sparse_block", "masked_block", "masked_tail")


def compile_regions(fcmae: FCMAE, *, backend: str = "inductor", mode: str | None = None,
                    dynamic: bool | None = False, options: dict | None = None,
                    regions: tuple[str, ...] = REGIONS) -> FCMAE:
    """Compile one encoder block of each backend and the training decoder + loss, in place.

    Every region is compiled with ``fullgraph=True``; blocks of the same shape reuse one graph
    (their parameters are graph inputs), and a region is compiled on its first call only.
    ``regions``: a subset of ``REGIONS`` (the sparse block, the masked-dense block, the decoder
    and loss of a training step). ``dynamic=None`` lets torch generalise to a symbolic shape
    after the second shape it sees; that made dynamo give up on these regions in a test here,
    so shapes stay static by default. Returns ``fcmae``; ``uncompile_regions`` undoes it.
    """
    unknown = set(regions) - set(REGIONS)
    if unknown:
        raise ValueError(f"unknown regions {sorted(unknown)}; choose from {REGIONS}")
    kw = dict(backend=backend, fullgraph=True, dynamic=dynamic)
    if mode is not None:
        kw["mode"] = mode
    if options:
        kw["options"] = options
    _allow_recompiles()
    functions = {"sparse_block": sparse_block, "masked_block": masked_block,
                 "masked_tail": FCMAE._masked_tail}
    compiled = {name: torch.compile(functions[name], **kw) for name in regions}
    fcmae.encoder.__dict__["_fast_regions"] = {k: v for k, v in compiled.items() if k != "masked_tail"}
    fcmae.__dict__["_fast_regions"] = {k: v for k, v in compiled.items() if k == "masked_tail"}
    return fcmae


def _allow_recompiles(limit: int = 64) -> None:
    """One compiled graph per block shape: 4 stages x several models exceed dynamo's default
    of 8 graphs per function, which with fullgraph=True is a hard error."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def uncompile_regions(fcmae: FCMAE) -> FCMAE:
    for module in (fcmae, fcmae.encoder):
        module.__dict__.pop("_fast_regions", None)
    return fcmae


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation of a plain model: ``torch.compile`` every ConvNeXt ``Block`` in
    place (same-shape blocks share one graph). Used for the unmasked dense baseline."""
    from ..models.model import Block

    kw = {"fullgraph": True, "dynamic": False, **compile_kwargs}
    _allow_recompiles()
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**kw)
    return model


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
