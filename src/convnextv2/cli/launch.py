"""``convnextv2 launch slurm``: a training command as a SLURM job, through ``submitit``.

The job has ``--nodes`` x ``--gpus-per-node`` tasks (one per GPU; one per node without GPUs).
Each task runs the training command in-process after ``submitit``'s
``TorchDistributedEnvironment`` has exported ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``: exactly what ``training/distributed.py`` reads under
``torchrun``, so the run is the same data-parallel run. When SLURM preempts the job or its
``--time`` runs out, ``submitit`` signals it, calls ``TrainingJob.checkpoint`` and requeues what
that returns: the same command with ``--resume auto`` (and without ``--overwrite``), which
continues from the newest run state in ``--output`` rather than starting over. The command is
checked before anything is submitted (a typo must not wait in the queue for hours), and
``--dry-run`` prints the sbatch script instead of submitting it. ``submitit`` is an optional
dependency: ``pip install convnextv2[cluster]``.
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
from pathlib import Path

HELP = "run a training command as a SLURM job (submitit; requeued with --resume auto)"
EPILOG = """examples:
  convnextv2 launch slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 72:00:00 -- \\
      pretrain --model convnextv2_base --data /shared/imagenet --amp bf16 \\
      --save-every-steps 1000 --output /shared/runs/base-fcmae
  convnextv2 launch slurm --gpus-per-node 4 --dry-run -- finetune --data /shared/imagenet \\
      --finetune /shared/runs/base-fcmae/encoder.safetensors --output /shared/runs/base-ft

Everything after -- is the training command (pretrain, finetune, detect train, segment train),
as it would be given to convnextv2. Preempted or timed out, the job is requeued with
--resume auto: it continues from the newest checkpoint in --output (--save-every-steps bounds
the work lost). Logs: <output>-slurm/ (--logs). Needs submitit: pip install convnextv2[cluster]."""

TRAINING_COMMANDS = ("pretrain", "finetune", "detect train", "segment train")
INSTALL = "pip install convnextv2[cluster]"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="scheduler", metavar="SCHEDULER", required=True)
    s = sub.add_parser("slurm", help="submit to SLURM through submitit",
                       description="Submit a training command to SLURM (submitit), one task "
                                   "per GPU, requeued with --resume auto on preemption or "
                                   "time-out.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = s.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=1, metavar="G",
                   help="GPUs per node, one task each (default 1; 0: one CPU task per node)")
    g.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    g.add_argument("--time", default="60", metavar="T",
                   help="wall time of each job: minutes, H:MM:SS or D-H:MM:SS (default 60); "
                        "at its end the job is requeued and resumes")
    g.add_argument("--cpus-per-task", type=int, default=None, metavar="N",
                   help="CPU cores per task (data-loader workers + 1 is a good start)")
    g.add_argument("--mem", default=None, help="memory per node, e.g. 64G (default: the "
                                               "partition's)")
    g.add_argument("--account", default=None, help="SLURM account to charge")
    g.add_argument("--qos", default=None, help="SLURM quality of service")
    g = s.add_argument_group("job")
    g.add_argument("--job-name", default=None,
                   help="default: convnextv2-<command>-<output folder name>")
    g.add_argument("--logs", default=None, metavar="DIR",
                   help="submitit's folder (job scripts, stdout/stderr per task; default "
                        "<output>-slurm, beside the run so that --overwrite cannot move it)")
    g.add_argument("--max-timeouts", type=int, default=3, metavar="N",
                   help="requeues after reaching --time (default 3; preemptions are "
                        "always requeued)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script that would be submitted; submit nothing")
    s.add_argument("training", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the training command and its options")


def run(args) -> int:
    argv, parsed = check_training_command(args.training)
    options = slurm_options(args)
    logs = Path(args.logs or f"{Path(parsed.output).expanduser()}-slurm").expanduser()
    name = args.job_name or f"convnextv2-{argv[0]}-{Path(parsed.output).name}"
    submitit = import_submitit()
    if args.dry_run:
        print(sbatch_script(logs, dict(options, job_name=name)))
        print(f"# each task then runs: convnextv2 {shlex.join(argv)}")
        return 0
    try:
        executor = submitit.SlurmExecutor(folder=str(logs), max_num_timeout=args.max_timeouts)
    except RuntimeError:  # submitit's "Could not detect srun"
        raise ValueError("no SLURM on this machine (srun not found); run it on "
                         "the cluster's login node, or add --dry-run to see the job") from None
    executor.update_parameters(job_name=name, **options)
    job = executor.submit(TrainingJob(argv))
    print(f"submitted SLURM job {job.job_id} ({options['nodes']} node(s) x "
          f"{options['ntasks_per_node']} task(s)): convnextv2 {shlex.join(argv)}\n"
          f"logs: {logs}; requeued with --resume auto on preemption or time-out")
    return 0


class TrainingJob:
    """What every task of the job runs: the training command, under the distributed
    environment ``submitit`` derives from SLURM's (torchrun's variables). ``checkpoint`` is
    submitit's requeue hook: the same command, continuing its run."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        import submitit

        # CUDA_VISIBLE_DEVICES is left as SLURM set it: the task takes the LOCAL_RANK-th
        # visible GPU (training/distributed.py), right also where the visible ones are not
        # numbered from 0 (no device cgroups), which submitit's rewrite to the rank would miss
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                              overwrite=True)
        from . import main

        code = main(self.argv)
        if code:  # a failed task fails the job (and shows in sacct), not a silent success
            raise RuntimeError(f"convnextv2 {' '.join(self.argv[:2])} exited with status {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainingJob(requeue_argv(self.argv)))


def requeue_argv(argv: list[str]) -> list[str]:
    """``argv`` continuing its run: ``--resume auto`` instead of any ``--resume``, and no
    ``--overwrite`` (which would move the run being continued aside)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == "--resume":
            skip = True
            continue
        if token.startswith("--resume=") or token == "--overwrite":
            continue
        out.append(token)
    return [*out, "--resume", "auto"]


def check_training_command(training: list[str]):
    """The training command after ``--``, parsed as ``convnextv2`` would parse it (its own
    mistakes are its own one-line errors), with an ``--output`` that a job may write to."""
    from ..training.output import check_output
    from . import build_parser
    from ._config_file import parse_command_line

    argv = list(training[1:] if training[:1] == ["--"] else training)
    command = " ".join(argv[:2]) if argv[:1] in (["detect"], ["segment"]) else " ".join(argv[:1])
    if command not in TRAINING_COMMANDS:
        got = f"got {command!r}" if command else "got none"
        raise ValueError(f"give the training command after --, one of "
                         f"{', '.join(TRAINING_COMMANDS)} ({got}); e.g. convnextv2 launch "
                         f"slurm --nodes 1 -- pretrain --data DIR --output RUN")
    parsed = parse_command_line(build_parser(), argv)
    if not getattr(parsed, "output", None):
        raise ValueError(f"convnextv2 {command}: give --output: the requeued job resumes "
                         f"from the run state there")
    check_output(parsed)  # a folder holding a run needs --resume or --overwrite: say so now
    return argv, parsed


def slurm_options(args) -> dict:
    """submitit's SlurmExecutor parameters from the command line (each value checked)."""
    for flag, value, low in (("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node,
                                                          0),
                             ("--cpus-per-task", args.cpus_per_task, 1),
                             ("--max-timeouts", args.max_timeouts, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.mem is not None and not re.fullmatch(r"\d+[KMGT]?", args.mem):
        raise ValueError(f"--mem {args.mem!r}: give a size like 64G, 500M or 128000 (MB)")
    options = dict(nodes=args.nodes, ntasks_per_node=max(1, args.gpus_per_node),
                   time=wall_minutes(args.time))
    if args.gpus_per_node:
        options["gpus_per_node"] = args.gpus_per_node
    for key in ("partition", "cpus_per_task", "mem", "account", "qos"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def wall_minutes(text: str) -> int:
    """``--time`` in whole minutes (rounded up): minutes, ``H:MM:SS`` or ``D-H:MM:SS``."""
    text = str(text).strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)", text)
    total = (int(m[1] or 0) * 86400 + int(m[2]) * 3600 + int(m[3]) * 60 + int(m[4])) if m else 0
    if total <= 0:
        raise ValueError(f"--time {text!r}: give minutes (e.g. 90), H:MM:SS (e.g. 72:00:00) or "
                         f"D-H:MM:SS (e.g. 3-00:00:00), more than zero")
    return math.ceil(total / 60)


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise ValueError(f"launch slurm needs the submitit package: {INSTALL}") from None
    return submitit


def sbatch_script(folder: Path, options: dict) -> str:
    """The sbatch file ``SlurmExecutor.submit`` writes for these options (the job id a
    placeholder), built without a cluster: the executor itself refuses to start without
    ``srun``."""
    import sys

    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).expanduser().absolute()
    command = (f"{shlex.quote(sys.executable)} -u -m submitit.core._submit "
               f"{shlex.quote(str(folder))}")
    return _make_sbatch_string(command=command, folder=folder, **options)
