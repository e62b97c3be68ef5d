"""The sparse backend's Triton depthwise kernels (``sparse_dwconv="triton"``).

On the CPU, Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels with NumPy: the
checks in ``_triton_interpreted.py`` compare them with a dense depthwise conv of the zero-filled
map and a whole FCMAE step with the masked dense backend, in float64. The CUDA checks live in
``test_gpu.py``. Without the interpreter, asking for "triton" on the CPU runs the PyTorch path.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masking import random_mask
from convnextv2.fcmae.sparse import resolve_dwconv

HERE = Path(__file__).parent


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_triton(), reason="Triton is not installed")
def test_interpreted_kernels_equal_dense_convolution():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(HERE / "_triton_interpreted.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "all interpreted checks passed" in done.stdout


def test_triton_falls_back_to_the_grid_kernel_on_the_cpu(monkeypatch, tiny_fcmae):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1)
    assert resolve_dwconv("triton", x) == "grid"
    assert resolve_dwconv("grid", x) == "grid"
    imgs = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, (4, 4), 0.6, generator=torch.Generator().manual_seed(0))
    losses = []
    for kernel in ("grid", "triton"):
        m = tiny_fcmae(sparse_dwconv=kernel)
        assert m.sparse_dwconv == kernel
        losses.append(m(imgs, mask)[0])
    assert torch.equal(losses[0], losses[1])


def test_unknown_kernel_is_refused(tiny_fcmae):
    with pytest.raises(ValueError, match="sparse_dwconv must be one of"):
        tiny_fcmae(sparse_dwconv="cudnn")
    with pytest.raises(ValueError, match="dwconv must be one of"):
        resolve_dwconv("cudnn", torch.zeros(1))
    with pytest.raises(ValueError, match="sparse_dwconv must be one of"):
        FCMAE.set_backend(tiny_fcmae(), "sparse", "cudnn")


def test_neighbour_table_by_hand():
    """Two 3x3 maps; sites on sample 0's diagonal and at sample 1's corner (flat 9, right
    after sample 0's last site, flat 8: the table must not reach across samples)."""
    from convnextv2.fcmae.triton_dwconv import neighbour_table

    table = neighbour_table(torch.tensor([0, 4, 8, 9]), n=2, h=3, w=3, ks=3)
    # taps in row-major (dy, dx) order, from (-1, -1) to (1, 1); one column per site
    want = torch.tensor([[-1, 0, 1, -1],
                         [-1, -1, -1, -1],
                         [-1, -1, -1, -1],
                         [-1, -1, -1, -1],
                         [0, 1, 2, 3],
                         [-1, -1, -1, -1],
                         [-1, -1, -1, -1],
                         [-1, -1, -1, -1],
                         [1, 2, -1, -1]], dtype=torch.int32)
    assert table.dtype == torch.int32
    assert torch.equal(table, want)


def test_pretrain_with_triton_on_the_cpu_says_so_and_trains_the_same(
        tmp_path, make_images, toy_cli, capsys, monkeypatch):
    from convnextv2 import training as T
    from convnextv2.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    data = make_images(tmp_path / "images", 8, size=(32, 32))
    args = [*toy_cli, "--img-size", "32", "--batch-size", "4", "--decoder-dim", "16",
            "--workers", "0", "--deterministic", "--no-progress", "--device", "cpu",
            "--data", str(data), "--epochs", "1"]
    losses = {}
    for kernel in ("grid", "triton"):
        out = tmp_path / kernel
        assert main(["pretrain", *args, "--output", str(out), "--sparse-dwconv", kernel]) == 0
        losses[kernel] = [r["loss"] for r in T.read_metrics(out / "metrics.jsonl")]
    assert len(losses["grid"]) == 2 and losses["grid"] == losses["triton"]
    assert "Triton kernels need CUDA" in capsys.readouterr().out
