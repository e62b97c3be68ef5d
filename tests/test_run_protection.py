"""A run is never destroyed (issue 10, items 2, 3 and 5): a folder holding a run is only
continued (``--resume``) or moved aside (``--overwrite``); a resume that would change the run
is refused; weight files are world-readable; bad values are refused before anything is
written."""
from __future__ import annotations

import hashlib
import os

import pytest

from convnextv2 import training as T
from convnextv2.cli import main

RUN = ["--img-size", "32", "--batch-size", "4", "--decoder-dim", "16", "--workers", "0",
       "--no-progress", "--device", "cpu", "--recon-every", "0", "--epochs", "1"]


def _digest(folder):
    """Names, sizes and contents of every file under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def images(tmp_path_factory, make_images):
    return make_images(tmp_path_factory.mktemp("images"), 8)


@pytest.fixture(scope="module")
def pretrain_args(toy_cli, images):
    return ["pretrain", *toy_cli, *RUN, "--data", str(images)]


@pytest.fixture()
def finished(pretrain_args, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main([*pretrain_args, "--output", str(out)]) == 0
    finally:
        os.umask(old)
    return out


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_folder_holding_a_run_is_not_started_over(finished, pretrain_args, capsys):
    before = _digest(finished)
    assert main([*pretrain_args, "--output", str(finished)]) == 2
    err = _one_line_error(capsys)
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert _digest(finished) == before


def test_overwrite_moves_the_old_run_aside(finished, pretrain_args, capsys):
    before = _digest(finished)
    assert main([*pretrain_args, "--output", str(finished), "--overwrite"]) == 0
    aside = [p for p in finished.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and _digest(aside[0]) == before  # moved whole, nothing deleted
    assert f"moved the old run in {finished} to {aside[0]}" in capsys.readouterr().out
    assert (finished / "encoder.safetensors").is_file()


def test_resume_with_a_run_changing_option_is_refused(finished, pretrain_args, capsys):
    before = _digest(finished)
    args = [*pretrain_args, "--output", str(finished), "--resume", "auto"]
    bigger = list(args)
    bigger[bigger.index("--batch-size") + 1] = "8"
    assert main(bigger) == 2
    err = _one_line_error(capsys)
    assert "effective_batch (4 -> 8)" in err and "new --output" in err
    assert _digest(finished) == before
    # a longer schedule is the same run continued: it goes on, with a note
    longer = list(args)
    longer[longer.index("--epochs") + 1] = "2"
    assert main(longer) == 0
    assert "epochs (1 -> 2)" in capsys.readouterr().out
    assert T.latest_checkpoint(finished).name == "checkpoint-00000004.pt"


def test_resume_auto_never_starts_over_finished_weights(finished, pretrain_args, capsys):
    for p in T.list_checkpoints(finished):  # e.g. deleted by hand to save space
        p.unlink()
    before = _digest(finished)
    assert main([*pretrain_args, "--output", str(finished), "--resume", "auto"]) == 2
    assert "no checkpoint to continue from" in _one_line_error(capsys)
    assert _digest(finished) == before


def test_weight_files_are_world_readable(finished):
    for name in ("encoder.safetensors", "fcmae.safetensors", "checkpoint-00000002.pt"):
        assert (finished / name).stat().st_mode & 0o777 == 0o644, name


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path, toy_arch):
    """A folder that also holds checkpoints of later steps (another run's): keep-last keeps
    the newest by step, but never the one just written."""
    from convnextv2.models.registry import create_model

    import torch
    model = create_model("atto", num_classes=2, **toy_arch)
    opt = torch.optim.AdamW(model.parameters())
    for step in (50, 60):
        T.save_run_state(tmp_path, T.build_run_state(model=model, optimizer=opt, epoch=0,
                                                     batches_done=0, global_step=step, args={}))
    path = T.save_run_state(tmp_path, T.build_run_state(model=model, optimizer=opt, epoch=0,
                                                        batches_done=0, global_step=2, args={}),
                            keep_last=1)
    assert path.is_file()
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt",
                                                              "checkpoint-00000060.pt"]


@pytest.mark.parametrize("bad, accepted", [
    (["--mask-ratio", "0"], "--mask-ratio must be in (0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--keep-last", "-1"], "--keep-last must be >= 0 (0 keeps every checkpoint)"),
    (["--resume", "auto", "--overwrite"], "pick one"),
])
def test_bad_pretrain_values_are_refused_before_writing(bad, accepted, pretrain_args, tmp_path,
                                                        capsys):
    out = tmp_path / "new"
    assert main([*pretrain_args, "--output", str(out), *bad]) == 2
    assert accepted in _one_line_error(capsys)
    assert not out.exists()


FINETUNE = ["finetune", "--data", "builtin", "--depths", "1", "1", "1", "1", "--dims", "8",
            "16", "24", "32", "--stem-stride", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("bad, accepted", [
    (["--smoothing", "1.5"], "--smoothing must be in [0, 1)"),
    (["--drop-path", "1.5"], "--drop-path must be in [0, 1)"),
    (["--aa", "bogus"], "--aa 'bogus'"),
    (["--train-subset", "0"], "--train-subset must be >= 1"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--keep-last", "-1"], "--keep-last must be >= 0"),
])
def test_bad_finetune_values_are_refused_before_writing(bad, accepted, tmp_path, capsys):
    out = tmp_path / "new"
    assert main([*FINETUNE, "--output", str(out), *bad]) == 2
    assert accepted in _one_line_error(capsys)
    assert not out.exists()


def test_finetune_also_protects_an_existing_run(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main([*FINETUNE, "--output", str(tmp_path)]) == 2
    assert "already holds a run (metrics.jsonl)" in _one_line_error(capsys)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
