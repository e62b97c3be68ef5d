"""Replayable runs: ``config.yaml`` in every run folder, and reading it back.

Every training command records the options its run actually used, resolved (a preset's
values, not "the preset's"), in ``config.yaml`` when the run starts (``run_session`` writes it,
rank 0). ``convnextv2 <command> --config FILE.yaml`` takes them back as the command's defaults
(``cli/_config_file.py``), so that a finished run can be repeated, or varied by a flag, from
one file. The keys are the command's option names with ``_`` for ``-`` (``batch_size`` for
``--batch-size``): the argparse destinations, which are also the config fields.

What is not written: ``resume`` and ``overwrite`` say what to do with an existing folder, not
what the run is, so a replay into a new ``--output`` does not try to continue the old one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .runstate import plain

CONFIG_FILE = "config.yaml"
NOT_REPLAYED = ("resume", "overwrite")


def replay_options(cfg) -> dict:
    """The options that repeat ``cfg``'s run: its fields (the config's own ``replay_options``
    hook first, for values whose ``None`` would mean "the recipe's" again), plain types."""
    own = getattr(cfg, "replay_options", None)
    values = own() if callable(own) else dataclasses.asdict(cfg)
    return {k: plain(v) for k, v in values.items() if k not in NOT_REPLAYED}


def write_run_config(cfg, out: Path) -> Path:
    """``out/config.yaml``: the run's options (atomic: a reader never sees half a file)."""
    import yaml

    from ..checkpoint.atomic import atomic_write_bytes

    header = ("# the options of this run; repeat it with\n"
              "#   convnextv2 <command> --config config.yaml --output NEW_FOLDER\n"
              "# (flags given on the command line override these values)\n")
    text = header + yaml.safe_dump(replay_options(cfg), sort_keys=False, default_flow_style=None)
    return atomic_write_bytes(text.encode(), Path(out) / CONFIG_FILE)


def read_run_config(path: str | Path) -> dict:
    """The options in a ``config.yaml`` (a mapping of option names to values); a missing,
    unreadable or non-mapping file is a one-line ``ValueError`` naming it."""
    import yaml

    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e}); give a "
                         f"config.yaml written by a training run") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"--config {path}: not valid YAML{at}; give a config.yaml written "
                         f"by a training run") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ValueError(f"--config {path}: expected a mapping of option names to values "
                         f"(like a run's config.yaml), got {type(values).__name__}")
    return values
