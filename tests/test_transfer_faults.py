"""Faults during ``detect train`` and ``segment train`` (one transfer engine, checked through
both commands): a full disk while writing a checkpoint, an evaluation that fails, a bad
validation image, a run that stopped during start-up, and Ctrl-C. Each ends in one line, keeps
the last good checkpoint and leaves nothing half-written."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convnextv2.cli import main

from conftest import TOY_FLAGS


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from convnextv2.transfer.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("fault_scenes")
    return write_synthetic(root / "scenes", n_train=4, n_val=1, size=64, seed=1)["detection"]


HEADS = {
    "detect": ["--img-size", "64", "--fpn-channels", "16", "--box-head-dim", "32",
               "--mask-head-dim", "8", "--anchor-sizes", "8", "16", "32", "64", "128"],
    "segment": ["--crop", "48", "--channels", "16", "--aux-channels", "8"],
}
COMMANDS = list(HEADS)


def _train(command, scenes, out, *extra):
    data = scenes.parent / ("detection" if command == "detect" else "segmentation")
    return [command, "train", "--data", str(data), *TOY_FLAGS, "--workers", "0", "--device",
            "cpu", "--batch-size", "2", *HEADS[command], "--output", str(out), *extra]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _second_checkpoint_fails(monkeypatch, fault: BaseException) -> None:
    """Make the second ``torch.save`` write 100 bytes and then raise ``fault``: a checkpoint
    half written when the disk fills or Ctrl-C lands."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"x" * 100)
            raise fault
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fault", [
    RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed "
                 "writing file data/12: file write failed"),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["inline_container", "ENOSPC"])
def test_a_full_disk_keeps_the_last_good_checkpoint(scenes, tmp_path, monkeypatch, capsys,
                                                    fault, command):
    _second_checkpoint_fails(monkeypatch, fault)
    out = tmp_path / "run"
    assert main(_train(command, scenes, out, "--no-progress", "--save-every-steps", "1",
                       "--max-steps", "3")) == 1
    line = _one_line(capsys.readouterr().err)
    assert "disk full" in line and "checkpoint-00000002.pt" in line, line
    assert "the last good checkpoint is" in line and "checkpoint-00000001.pt" in line, line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000001.pt"]
    state = torch.load(out / "checkpoint-00000001.pt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1
    assert _temps(out) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_during_a_checkpoint_write_leaves_no_temp_file(scenes, tmp_path, monkeypatch,
                                                              capsys, command):
    """The Ctrl-C the subprocess test below cannot time: it lands while the second
    checkpoint is half written. Exit 130, one line, the half-written file is gone and the
    first checkpoint is intact."""
    _second_checkpoint_fails(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "run"
    assert main(_train(command, scenes, out, "--no-progress", "--save-every-steps", "1",
                       "--max-steps", "3")) == 130
    assert _one_line(capsys.readouterr().err).endswith("interrupted")
    assert _temps(out) == []
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000001.pt"]
    state = torch.load(out / "checkpoint-00000001.pt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_is_saved_before_an_evaluation_that_fails(scenes, tmp_path, monkeypatch,
                                                               capsys, command):
    from convnextv2.detection.train import DetectionTask
    from convnextv2.segmentation.train import SegmentationTask

    def broken(self, *args, **kwargs):
        raise ValueError("val mask scene_00000.png: values 7..9 are beyond the 5 classes")

    task = DetectionTask if command == "detect" else SegmentationTask
    monkeypatch.setattr(task, "evaluate", broken)
    out = tmp_path / "run"
    assert main(_train(command, scenes, out, "--no-progress", "--epochs", "1")) == 2
    assert "beyond the 5 classes" in _one_line(capsys.readouterr().err)
    assert (out / "checkpoint-00000002.pt").is_file()  # the epoch's 2 steps are not lost


def test_a_bad_validation_image_is_found_before_training(scenes, tmp_path, capsys):
    import shutil

    from PIL import Image

    data = tmp_path / "detection"
    shutil.copytree(scenes, data)
    first = sorted((data / "val").iterdir())[0]
    Image.new("RGB", (30, 20)).save(first, format="JPEG")
    out = tmp_path / "run"
    argv = _train("detect", data, out, "--no-progress", "--epochs", "1")
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert first.name in line and "30x20" in line
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_run_that_stopped_during_start_up_does_not_block_a_re_run(scenes, tmp_path, capsys,
                                                                    command):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.jsonl", "steps.jsonl"):
        (out / name).write_bytes(b"")
    (out / "config.yaml").write_text("model: null\n")
    assert main(_train(command, scenes, out, "--no-progress", "--max-steps", "1")) == 0
    assert (out / "steps.jsonl").stat().st_size > 0
    capsys.readouterr()
    # a run with something in its logs is still protected
    assert main(_train(command, scenes, out, "--no-progress", "--max-steps", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_keeps_the_last_good_checkpoint_and_no_temp_file(scenes, tmp_path, command):
    """SIGINT while training (progress bar on, a checkpoint every step): exit 130, one line,
    no abort from a writer thread, no ``.tmp`` left, the newest checkpoint loads."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "convnextv2",
                             *_train(command, scenes, out, "--save-every-steps", "1",
                                     "--iters", "400", "--keep-last", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(out.glob("checkpoint-*.pt"))) < 2:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert len(list(out.glob("checkpoint-*.pt"))) >= 2, "no checkpoints in 240 s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.endswith("interrupted") and "Traceback" not in err, err[-2000:]
    assert _temps(out) == []
    newest = sorted(out.glob("checkpoint-*.pt"))[-1]
    state = torch.load(newest, map_location="cpu", weights_only=True)
    assert state["global_step"] >= 2
