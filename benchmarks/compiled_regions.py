"""Per-block (regional) torch.compile of FCMAE and of a plain model, for the benchmarks and tests.

``torch.compile(fcmae, fullgraph=True)`` compiles the whole forward (encoder, decoder, loss) as
one graph, backward included, for either backend; compiling a base or large model that way
takes minutes on the first step. ``compile_regions`` compiles the repeated pieces instead: one
encoder block of either backend, and the decoder + loss of a training step. Blocks of the same
shape share one compiled graph, so compile time is a few graphs per model instead of one graph
of every block; the per-block glue (stem, downsampling, sparse layout) stays eager. Combined
with ``train_step.TrainStep``'s CUDA graph, that glue costs no host time either.

The library looks the compiled regions up itself (``convnextv2.models.runtime.compiled_region``):
this module only fills the ``compiled_regions`` attribute it reads.
"""
from __future__ import annotations

import torch
from torch import nn

from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masked_dense import masked_block
from convnextv2.fcmae.sparse import sparse_block
from convnextv2.models.model import Block
from convnextv2.models.runtime import COMPILED_REGIONS

REGIONS = ("sparse_block", "masked_block", "masked_tail")
ENCODER_REGIONS = ("sparse_block", "masked_block")  # looked up on the encoder; the rest on FCMAE


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
    allow_recompiles()
    functions = {"sparse_block": sparse_block, "masked_block": masked_block,
                 "masked_tail": FCMAE.forward_masked_tail}
    compiled = {name: torch.compile(functions[name], **kw) for name in regions}
    setattr(fcmae.encoder, COMPILED_REGIONS,
            {k: v for k, v in compiled.items() if k in ENCODER_REGIONS})
    setattr(fcmae, COMPILED_REGIONS,
            {k: v for k, v in compiled.items() if k not in ENCODER_REGIONS})
    return fcmae


def uncompile_regions(fcmae: FCMAE) -> FCMAE:
    """Back to the plain functions everywhere."""
    for module in (fcmae, fcmae.encoder):
        module.__dict__.pop(COMPILED_REGIONS, None)
    return fcmae


def allow_recompiles(limit: int = 64) -> None:
    """One compiled graph per block shape: 4 stages x several models exceed dynamo's default
    of 8 graphs per function, which with fullgraph=True is a hard error."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation of a plain model: ``torch.compile`` every ConvNeXt ``Block`` in
    place (same-shape blocks share one graph). Used for the unmasked dense baseline."""
    kw = {"fullgraph": True, "dynamic": False, **compile_kwargs}
    allow_recompiles()
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**kw)
    return model
