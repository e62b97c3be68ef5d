"""What the fast paths ask about the run they are in, answered in one place.

The speed paths of the model and of FCMAE (fused GRN, the CPU depthwise weight gradient, the
sparse encoder's kernels) are eager-mode tricks with hand-written autograd. Each must know
whether it may run: not while exporting (exporters understand only the literal formulas), not
where hooks on every module would miss a skipped module call, and with care under torch.compile
(no host reads, no Python caches) and under autocast (a custom node casts its inputs itself and
runs with autocast off). The checks live here so every path asks the same question the same way.
"""
from __future__ import annotations

import contextlib

import torch


def compiling() -> bool:
    """True while dynamo traces (torch.compile): no host reads of tensors, no Python caches."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype when autocast is on, else x's."""
    kind = x.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4 or an unknown device type
        pass
    return x.dtype


def autocast_off(x: torch.Tensor):
    """Autocast switched off for ``x``'s device (a no-op context on the meta device, which
    autocast does not know: shape-only runs, e.g. checking that nothing reads values back)."""
    if x.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Where statistics of ``x`` are summed: float32, or float64 for double inputs (a sum of
    squares in fp16 overflows for ordinary activations)."""
    return torch.promote_types(x.dtype, torch.float32)


def plain_math() -> bool:
    """True while tracing, scripting or exporting to ONNX: then the literal formulas run, which
    every exporter understands (custom autograd nodes and oneDNN ops are eager-only tricks)."""
    try:
        return bool(torch.jit.is_tracing() or torch.jit.is_scripting()
                    or torch.onnx.is_in_onnx_export())
    except AttributeError:  # pragma: no cover - very old torch
        return False


def global_hooks() -> bool:
    """True when hooks are registered on every module (``register_module_forward_hook``): then
    the fast paths that skip a module's ``__call__`` must not run, or the hooks would miss it."""
    from torch.nn.modules import module as nn_module
    return bool(getattr(nn_module, "_global_forward_hooks", None)
                or getattr(nn_module, "_global_forward_pre_hooks", None))


COMPILED_REGIONS = "compiled_regions"
"""The attribute under which a module may hold compiled versions of its regions: a dict from a
region's name to a function with the same signature as the region's plain function. Whoever
compiles regions sets it (``benchmarks/compiled_regions.py``); deleting it undoes that."""


def compiled_region(module: torch.nn.Module, name: str, default):
    """The function that computes region ``name`` of ``module``: the compiled one that
    ``module.compiled_regions`` holds for it, else ``default``. Inside an outer torch.compile
    the plain function is traced, never a nested compiled one. The regions: ``"sparse_block"``
    and ``"masked_block"`` (one encoder block, per backend, looked up on the encoder) and
    ``"masked_tail"`` (the training decoder and loss, looked up on the FCMAE module)."""
    if compiling():
        return default
    return module.__dict__.get(COMPILED_REGIONS, {}).get(name, default)
