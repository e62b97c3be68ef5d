"""Replayable runs: every training command writes config.yaml; ``--config`` takes it back, with
flags on the command line overriding it, and a replay repeats the run's step losses bit for
bit."""
from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import TOY_FLAGS

from convnextv2 import training as T
from convnextv2.cli import build_parser, main
from convnextv2.cli._config_file import parse_command_line
from convnextv2.training.replay import CONFIG_FILE, write_run_config

PRETRAIN = ["pretrain", "--model", "atto", *TOY_FLAGS, "--stem-stride", "1", "--in-chans", "1",
            "--img-size", "32", "--decoder-dim", "16", "--data", "builtin", "--epochs", "1",
            "--batch-size", "8", "--max-steps", "3", "--lr", "1e-3", "--warmup-steps", "1",
            "--deterministic", "--no-progress", "--workers", "0", "--device", "cpu",
            "--recon-every", "0"]
FINETUNE = ["finetune", "--model", "atto", *TOY_FLAGS, "--stem-stride", "1", "--data", "builtin",
            "--train-subset", "16", "--val-subset", "8", "--batch-size", "4", "--epochs", "1",
            "--lr", "5e-3", "--aa", "none", "--deterministic", "--no-progress", "--workers", "0",
            "--device", "cpu"]


def _losses(out, name):
    return [(r["step"], r["loss"]) for r in T.read_metrics(out / name)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "first"
    assert main([*PRETRAIN, "--output", str(out)]) == 0
    return out


def test_pretrain_writes_the_resolved_options_and_a_replay_repeats_every_loss(pretrained):
    saved = yaml.safe_load((pretrained / CONFIG_FILE).read_text())
    assert saved["depths"] == [1, 1, 1, 1] and saved["lr"] == 1e-3 and saved["max_steps"] == 3
    assert "resume" not in saved and "overwrite" not in saved  # folder policy, not the run
    again = pretrained.parent / "again"
    assert main(["pretrain", "--config", str(pretrained / CONFIG_FILE),
                 "--output", str(again)]) == 0
    first = _losses(pretrained, "metrics.jsonl")
    assert len(first) == 3
    assert _losses(again, "metrics.jsonl") == first  # exact float equality
    replayed = yaml.safe_load((again / CONFIG_FILE).read_text())
    assert replayed == dict(saved, output=str(again))


def test_command_line_flags_override_the_file(pretrained):
    other = pretrained.parent / "other-seed"
    assert main(["pretrain", "--seed", "7", "--config", str(pretrained / CONFIG_FILE),
                 "--max-steps", "2", "--output", str(other)]) == 0
    saved = yaml.safe_load((other / CONFIG_FILE).read_text())
    assert (saved["seed"], saved["max_steps"], saved["lr"]) == (7, 2, 1e-3)
    assert _losses(other, "metrics.jsonl") != _losses(pretrained, "metrics.jsonl")[:2]


def test_finetune_replay_repeats_every_loss_with_the_resolved_preset(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main([*FINETUNE, "--output", str(first)]) == 0
    saved = yaml.safe_load((first / CONFIG_FILE).read_text())
    # the preset's values are written, not "the preset's": a reader sees what ran
    assert saved["recipe"] != "auto" and saved["smoothing"] is not None
    assert saved["auto_augment"] == "none"  # off stays off when read back
    assert main(["finetune", "--config", str(first / CONFIG_FILE), "--output", str(again)]) == 0
    assert _losses(again, "steps.jsonl") == _losses(first, "steps.jsonl")


TRANSFER_ARGV = {
    "detect train": ["detect", "train", "--data", "builtin", "--model", "atto", "--iters", "3",
                     "--lr", "2e-4", "--train-images", "imgs", "--threads", "1"],
    "segment train": ["segment", "train", "--data", "builtin", "--model", "atto", "--iters", "3",
                      "--num-classes", "5", "--crop", "64"],
}


@pytest.mark.parametrize("command", TRANSFER_ARGV)
def test_transfer_commands_round_trip_their_options(command, tmp_path):
    """detect|segment train: the config and the task's own options come back from the file."""
    from convnextv2.transfer.engine import TransferConfig

    parser = build_parser()
    argv = [*TRANSFER_ARGV[command], "--output", str(tmp_path / "run")]
    cfg = T.config_from_args(TransferConfig, parser.parse_args(argv))
    assert cfg.command_options  # the task's options (data files, head sizes) are kept
    write_run_config(cfg, tmp_path)
    back = parse_command_line(build_parser(), [*command.split(), "--config",
                                               str(tmp_path / CONFIG_FILE)])
    assert T.config_from_args(TransferConfig, back) == dataclasses.replace(cfg, resume=None)


@pytest.mark.parametrize("content,words", [
    ("epochs: 2\nbogus_option: 1\n", ["bogus_option", "unknown key"]),
    ("epochs: two\n", ["epochs", "integer"]),
    ("backend: fast\n", ["backend", "sparse, dense"]),
    ("deterministic: 1\n", ["deterministic", "true or false"]),
    ("depths: [1, 1]\n", ["depths", "4 values"]),
    ("betas: 0.9\n", ["betas", "list"]),
    ("- just\n- a list\n", ["mapping"]),
    ("epochs: [1\n", ["not valid YAML"]),
])
def test_a_bad_config_file_is_one_line_and_exit_2(content, words, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(path), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert all(w.lower() in err[0].lower() for w in [str(path), *words]), err[0]
    assert not (tmp_path / "o").exists()


def test_the_file_may_supply_a_required_option(tmp_path):
    """``--output`` is required on the command line, unless the file gives it."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "from-file"), "epochs": 3}))
    args = parse_command_line(build_parser(), ["pretrain", "--config", str(path)])
    assert (args.output, args.epochs) == (str(tmp_path / "from-file"), 3)
