"""Export a classifier to ONNX or TorchScript, checked against PyTorch on the spot.

Both exports take a dynamic batch size; the check runs the exported file on two batch sizes
and requires the logits to match PyTorch's within ``atol`` (1e-4 by default), scaled by the
largest logit when that exceeds 1 (rounding errors grow with the values, and other CPUs round
differently).

The file is written under a hidden temporary name beside the target and renamed only after the
check passes: a failed or interrupted export never replaces a good file, nor leaves half of one.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

FORMATS = ("onnx", "torchscript")


def export_model(model: nn.Module, path: str | Path, fmt: str, img_size: int = 224,
                 in_chans: int | None = None, atol: float = 1e-4, opset: int = 17,
                 verify: bool = True) -> dict:
    """Write ``model`` to ``path`` as ``fmt`` and (by default) verify it; returns the check's
    numbers: ``max_abs_diff`` per batch size tried."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model = model.eval().float()
    in_chans = in_chans or getattr(model, "config", {}).get("in_chans", 3)
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        example = torch.randn(2, in_chans, img_size, img_size)
        if fmt == "onnx":
            _export_onnx(model, example, tmp, opset)
            run = _onnx_runner(tmp)
        else:
            with torch.no_grad(), warnings.catch_warnings():  # TorchScript is deprecated
                warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
                traced = torch.jit.trace(model, example)
                traced.save(str(tmp))
                loaded = torch.jit.load(str(tmp))

            def run(x):
                with torch.no_grad():
                    return loaded(torch.from_numpy(x)).numpy()
        report = dict(format=fmt, path=str(path), img_size=img_size, in_chans=in_chans)
        if verify:
            report["max_abs_diff"] = verify_export(model, run, in_chans, img_size, atol)
        os.chmod(tmp, 0o644)  # mkstemp made it private; an exported model is meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return report


def _temp_beside(path: Path) -> Path:
    """A new empty hidden file in ``path``'s folder (same file system, so the final rename is
    atomic); a clear error when the folder cannot be created or written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise PermissionError(f"cannot write {path}: {e.strerror or e}; pick a folder you can "
                              f"write to") from None
    os.close(fd)
    return Path(tmp)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise RuntimeError("ONNX export needs the onnx package: pip install onnx onnxruntime"
                           ) from e
    # the legacy (TorchScript-based) exporter: the torch.export-based default needs onnxscript,
    # which is not a dependency, and gains nothing for a network without control flow
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


def _onnx_runner(path: Path):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeError("verifying an ONNX export needs onnxruntime: pip install onnxruntime"
                           ) from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def verify_export(model: nn.Module, run, in_chans: int, img_size: int, atol: float = 1e-4,
                  batch_sizes=(1, 3)) -> dict[int, float]:
    """Compare the exported runner with PyTorch on random batches of several sizes; the limit
    is ``atol`` times the largest PyTorch logit when that exceeds 1."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    diffs = {}
    for bs in batch_sizes:
        x = torch.randn(bs, in_chans, img_size, img_size, generator=gen)
        with torch.no_grad():
            expected = model(x).numpy()
        got = np.asarray(run(x.numpy()))
        if got.shape != expected.shape:
            raise RuntimeError(f"exported model returned shape {got.shape} for batch {bs}, "
                               f"PyTorch {expected.shape}")
        diffs[bs] = float(np.abs(got - expected).max())
        limit = atol * max(1.0, float(np.abs(expected).max()))
        if not diffs[bs] <= limit:  # a NaN difference fails too
            raise RuntimeError(f"exported model differs from PyTorch by {diffs[bs]:.3g} "
                               f"(> {limit:.3g}) at batch size {bs}")
    return diffs
