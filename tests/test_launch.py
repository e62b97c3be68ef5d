"""``convnextv2 launch slurm``: the job submitit would submit, the training command run under
submitit's distributed environment (its local executor: two processes, gloo, CPU), and a
requeue that resumes the run instead of restarting it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TOY_FLAGS

import convnextv2
from convnextv2 import training as T
from convnextv2.cli import main
from convnextv2.cli.launch import TrainingJob, requeue_argv, wall_minutes

submitit = pytest.importorskip("submitit")

PRETRAIN = ["pretrain", "--model", "atto", *TOY_FLAGS, "--stem-stride", "1", "--in-chans", "1",
            "--img-size", "32", "--decoder-dim", "16", "--data", "builtin", "--epochs", "1",
            "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "1", "--deterministic",
            "--no-progress", "--workers", "0", "--device", "cpu", "--recon-every", "0"]


def _losses(out: Path):
    return [(r["step"], r["loss"]) for r in T.read_metrics(out / "metrics.jsonl")]


def test_dry_run_prints_the_sbatch_job_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                 "--time", "1-00:00:30", "--cpus-per-task", "8", "--mem", "64G", "--account",
                 "proj", "--qos", "high", "--dry-run", "--", *PRETRAIN, "--output",
                 str(out)]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1441", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=64G", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --signal=USR2@", "srun", "submitit.core._submit",
                 f"{out}-slurm"):
        assert line in script, line
    assert "convnextv2 pretrain" in script and str(out) in script
    assert list(tmp_path.iterdir()) == []  # nothing submitted, nothing written


def test_wall_time_forms():
    assert [wall_minutes(t) for t in ("90", "72:00:00", "0:00:01", "2-01:30:00")] == [
        90, 4320, 1, 2 * 1440 + 90]
    for bad in ("0", "1:2", "-5", "ten", "1:99:00"):
        with pytest.raises(ValueError, match="--time"):
            wall_minutes(bad)


def test_requeued_command_resumes_and_never_overwrites():
    argv = ["pretrain", "--output", "o", "--overwrite", "--resume", "x.pt", "--seed", "1"]
    assert requeue_argv(argv) == ["pretrain", "--output", "o", "--seed", "1", "--resume", "auto"]
    assert requeue_argv(["finetune", "--resume=auto"]) == ["finetune", "--resume", "auto"]
    delayed = TrainingJob(["pretrain", "--output", "o"]).checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function.argv == ["pretrain", "--output", "o", "--resume", "auto"]


def test_two_step_pretrain_under_submitits_distributed_environment(tmp_path, monkeypatch):
    """The local executor starts 2 tasks as SLURM would; each one joins the process group from
    the variables TorchDistributedEnvironment exports (gloo on the CPU)."""
    src = str(Path(convnextv2.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    executor = submitit.LocalExecutor(folder=str(tmp_path / "logs"))
    executor.update_parameters(tasks_per_node=2, timeout_min=10)
    job = executor.submit(TrainingJob([*PRETRAIN, "--max-steps", "2", "--output", str(out)]))
    assert job.results() == [0, 0], job.stderr()
    assert "2 processes" in job.stdout()  # rank 0 saw a world of two
    assert [s for s, _ in _losses(out)] == [1, 2]
    assert (out / "encoder.safetensors").exists()


def test_a_requeued_job_resumes_its_run_and_repeats_the_uninterrupted_losses(tmp_path, capsys):
    """Preempted after step 2 (simulated: the first job stops there), the job submitit requeues
    continues from checkpoint 2: the same 4 step losses as a run that went through."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    argv = [*PRETRAIN, "--max-steps", "4", "--save-every-steps", "1"]
    assert main([*argv, "--output", str(whole)]) == 0
    executor = submitit.DebugExecutor(folder=str(tmp_path / "logs"))
    first = executor.submit(TrainingJob([*argv[:-4], "--max-steps", "2", "--output", str(cut)]))
    assert first.result() == 0
    assert [s for s, _ in _losses(cut)] == [1, 2]
    requeued = TrainingJob([*argv, "--output", str(cut)]).checkpoint()  # what submitit calls
    capsys.readouterr()
    second = executor.submit(requeued.function, *requeued.args, **requeued.kwargs)
    assert second.result() == 0
    assert "resumed from" in capsys.readouterr().out  # not a fresh start
    assert _losses(cut) == _losses(whole)  # continued from step 2, bit for bit
    assert len(T.list_checkpoints(cut)) >= 1
