"""torchrun: DDP and FSDP2 pretraining give the parameters of a 1-process run with the same
global batch, sharded checkpoints are plain files, and distributed evaluation counts every
image once (issue 5, items 1 and 2).

All multi-process runs are real ``torchrun --standalone --nproc_per_node 2`` launches on the
CPU (gloo), started from the test; the tiny encoder (depths 1-1-1-1, dims 8-16-24-32,
stem stride 1, 32 px) keeps them to seconds.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from convnextv2 import training as T
from convnextv2.cli import main

PRETRAIN_RUN = ["--img-size", "32", "--decoder-dim", "16", "--workers", "0",
            "--no-progress", "--device", "cpu", "--recon-every", "0", "--epochs", "2",
            "--blr", "0.2", "--keep-last", "0", "--save-every-steps", "1"]
ATOL = 1e-5


def _torchrun(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "convnextv2", *map(str, argv)],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    return out


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def _assert_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=ATOL, msg=key)


def _losses(run):
    return [(r["step"], r["loss"], r["lr"]) for r in T.read_metrics(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_images, toy_cli, toy_arch):
    """16 images; global batch 8 = 1 process x 8 = 2 processes x 4: 2 steps per epoch.

    - ``one``: one process (in this test process), 4 steps, a checkpoint after each;
    - ``ddp``: torchrun 2 x 4, DDP, 4 steps;
    - ``fsdp``: torchrun 2 x 4 --fsdp, resumed from ``one``'s step-2 checkpoint (a full
      file into a sharded model), stopped after step 3 (a gathered checkpoint), then resumed
      in ONE process to step 4 (a sharded run's file into a plain model);
    - ``eval``: torchrun 2 x ``eval`` of a classifier on 7 images (odd: a padded split
      would count one twice);
    - ``finetune``: torchrun 2 x ``finetune``, 1 epoch, validating on the same 7 images.
    """
    root = tmp_path_factory.mktemp("dist")
    data = make_images(root / "images", 16)
    val = make_images(root / "val", 7, seed=3, classes=["a", "b"])
    from convnextv2.checkpoint import save_checkpoint
    from convnextv2.models.registry import create_model
    torch.manual_seed(0)
    classifier = create_model("atto", num_classes=2, stem_stride=1, **toy_arch)
    save_checkpoint(classifier, root / "clf.safetensors", layout="native")
    eval_args = ["eval", "--checkpoint", root / "clf.safetensors", "--data", val, "--img-size",
                 "32", "--device", "cpu", "--batch-size", "2", "--json"]
    procs = {"eval": _torchrun(*eval_args, "--output", root / "eval2")}
    make_images(root / "ft" / "train", 16, seed=4, classes=["a", "b"])
    shutil.copytree(val, root / "ft" / "val")
    procs["finetune"] = _torchrun(
        "finetune", *toy_cli, "--img-size", "32", "--batch-size", "4", "--epochs", "1", "--aa",
        "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--no-model-ema",
        "--no-progress", "--device", "cpu", "--data", root / "ft", "--output", root / "ft-run")

    one, ddp, fsdp = root / "one", root / "ddp", root / "fsdp"
    PRETRAIN = ["pretrain", *toy_cli, *PRETRAIN_RUN]
    assert main([*PRETRAIN, "--batch-size", "8", "--data", str(data), "--output", str(one)]) == 0
    fsdp.mkdir()
    shutil.copy(one / "checkpoint-00000002.pt", fsdp)
    procs["ddp"] = _torchrun(*PRETRAIN, "--batch-size", "4", "--data", data, "--output", ddp)
    procs["fsdp"] = _torchrun(*PRETRAIN, "--batch-size", "4", "--data", data, "--output", fsdp,
                              "--fsdp", "--resume", "auto", "--max-steps", "3")
    outs = {name: _wait(p) for name, p in procs.items()}
    fsdp_step3 = _weights_of_state(fsdp / "checkpoint-00000003.pt")
    fsdp_encoder_at_3 = _weights(fsdp / "encoder.safetensors")
    assert main([*PRETRAIN, "--batch-size", "8", "--data", str(data), "--output", str(fsdp),
                 "--resume", "auto"]) == 0
    eval_one = root / "eval1"
    return dict(root=root, one=one, ddp=ddp, fsdp=fsdp, outs=outs, fsdp_step3=fsdp_step3,
                fsdp_encoder_at_3=fsdp_encoder_at_3, eval_args=eval_args, eval_one=eval_one)


def _weights_of_state(path):
    return T.load_run_state(path)["model"]


def test_ddp_two_processes_match_one_process(runs):
    _assert_close(_weights(runs["ddp"] / "fcmae.safetensors"),
                  _weights(runs["one"] / "fcmae.safetensors"))
    one, two = _losses(runs["one"]), _losses(runs["ddp"])
    assert [s for s, _, _ in two] == [1, 2, 3, 4]
    assert [lr for _, _, lr in two] == [lr for _, _, lr in one]  # same effective batch -> lr
    assert [v for _, v, _ in two] == pytest.approx([v for _, v, _ in one], abs=ATOL)
    # the weights really moved: the comparison is not between two initialisations
    first = _weights_of_state(runs["one"] / "checkpoint-00000001.pt")
    last = _weights(runs["one"] / "fcmae.safetensors")
    assert max((first[k] - last[k]).abs().max().item() for k in last) > 1e-3


def test_effective_batch_and_rank_zero_only_logging(runs):
    out = runs["outs"]["ddp"]
    assert "effective batch 8" in out and "2 processes" in out
    assert out.count("done: 4 steps") == 1  # rank 1 printed nothing
    lr_line = 0.2 * 8 / 256  # blr x (4 per process x 1 accum x 2 processes) / 256
    assert f"lr {lr_line:.3g}" in out
    state = T.load_run_state(runs["ddp"] / "checkpoint-00000004.pt")
    assert state["extra"]["world_size"] == 2
    assert len(T.read_metrics(runs["ddp"] / "metrics.jsonl")) == 4  # one writer


def test_fsdp_resumes_a_plain_checkpoint_and_writes_plain_checkpoints(runs, toy_arch):
    from convnextv2.recipes.pretrain import PretrainConfig, build_fcmae, pretrain_param_groups

    step3 = runs["fsdp_step3"]
    assert all(type(v) is torch.Tensor for v in step3.values())  # gathered, not DTensors
    _assert_close(step3, _weights_of_state(runs["one"] / "checkpoint-00000003.pt"))
    # loads strictly into a single-process model
    cfg = PretrainConfig(model="atto", stem_stride=1, img_size=32, decoder_dim=16, **toy_arch)
    plain = build_fcmae(cfg)
    plain.load_state_dict(step3, strict=True)
    state = T.load_run_state(runs["fsdp"] / "checkpoint-00000003.pt")
    plain_optim = torch.optim.AdamW(pretrain_param_groups(plain, cfg))
    plain_optim.load_state_dict(state["optimizer"])  # positions, not DTensor names
    # the encoder file written at the end of the sharded run is the gathered encoder
    encoder = {k[len("encoder."):]: v for k, v in step3.items() if k.startswith("encoder.")
               and not k.startswith("encoder.head.")}
    _assert_close(runs["fsdp_encoder_at_3"], encoder)


def test_a_sharded_runs_checkpoint_resumes_in_one_process_to_the_same_weights(runs):
    _assert_close(_weights(runs["fsdp"] / "fcmae.safetensors"),
                  _weights(runs["one"] / "fcmae.safetensors"))
    got, want = _losses(runs["fsdp"]), _losses(runs["one"])
    assert [s for s, _, _ in got] == [3, 4]  # step 3 sharded, step 4 in one process
    assert [v for _, v, _ in got] == pytest.approx([v for _, v, _ in want[2:]], abs=ATOL)


def test_distributed_eval_counts_each_image_once(runs, capsys):
    two = json.loads(runs["outs"]["eval"].strip().splitlines()[-1])
    assert main([*map(str, runs["eval_args"]), "--output", str(runs["eval_one"])]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert two["count"] == one["count"] == 7
    assert sum(map(sum, two["confusion"])) == 7
    assert two["confusion"] == one["confusion"]
    assert two["top1"] == pytest.approx(one["top1"])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert (runs["root"] / "eval2" / "eval.json").is_file()


def test_sharded_split_has_no_padding_and_no_overlap():
    from convnextv2.training.dist_eval import shard_indices

    for n in (0, 1, 5, 7, 8):
        for world in (1, 2, 3):
            parts = [shard_indices(n, T.DistInfo(rank=r, world_size=world))
                     for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))


def test_finetune_under_torchrun_validates_each_image_once(runs, capsys):
    """The per-epoch validation of a 2-process fine-tuning run equals a 1-process ``eval`` of
    the weights it saved: 7 images, so a padded split (8) could not give the same top-1."""
    run = runs["root"] / "ft-run"
    out = runs["outs"]["finetune"]
    assert out.count("best top-1") == 1  # rank 0 alone reports
    final = json.loads((run / "summary.json").read_text())["final"]
    assert main(["eval", "--checkpoint", str(run / "last.safetensors"), "--data",
                 str(runs["root"] / "ft"), "--device", "cpu", "--json", "--output",
                 str(runs["root"] / "ft-eval")]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert single["count"] == 7
    assert final["val_top1"] == pytest.approx(single["top1"])
    assert final["val_loss"] == pytest.approx(single["loss"], rel=1e-5)
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["effective_batch"] == 8
