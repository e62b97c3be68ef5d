"""``--config FILE.yaml`` of the training commands: a run's ``config.yaml`` as the defaults.

A training run records its resolved options in ``config.yaml`` (``training.replay``). Given
back with ``--config``, each key becomes the default of the option of the same destination,
before the command line is parsed, so a flag given on the command line still wins, and an
option the file sets (``--output``) is no longer required. Keys that are config fields without
a flag (``betas``) pass through to the config. A key the command does not know, or a value of
the wrong type or outside an option's choices, is a one-line usage error (exit 2) naming the
file, the key and what is accepted: a typo must not silently run the recipe's default.
"""
from __future__ import annotations

import argparse
import dataclasses

# destinations that are the parser's own, never options a file may set
_RESERVED = ("help", "config", "command", "action")


class ConfigFileAction(argparse.Action):
    """``--config FILE.yaml``: stores the path; ``parse_command_line`` reads the file first.
    ``config_class``: the command's config dataclass (its fields are accepted keys too)."""

    def __init__(self, option_strings, dest, config_class=None, **kwargs):
        self.config_class = config_class
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def add_config_argument(group, config_class) -> None:
    group.add_argument("--config", action=ConfigFileAction, config_class=config_class,
                       default=None, metavar="FILE.yaml",
                       help="take the options from a run's config.yaml (every training run "
                            "writes one); flags given here override it, e.g. "
                            "--config runs/a/config.yaml --output runs/b --seed 1")


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None):
    """``parser.parse_args(argv)``, with the defaults of the chosen command taken from the
    file named by its ``--config`` first (when it has one and it is given)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path(argv)
    if path is not None:
        command = _command_parser(parser, argv)
        if command is not None and "config" in _main_actions(command):
            apply_config_file(command, path)
    return parser.parse_args(argv)


def apply_config_file(command: argparse.ArgumentParser, path: str) -> None:
    """Make the options in ``path`` the defaults of ``command`` (usage error on a bad file)."""
    from ..training.replay import read_run_config

    try:
        values = read_run_config(path)
    except ValueError as e:
        command.error(str(e))
    actions = _main_actions(command)
    fields = {f.name: f for f in dataclasses.fields(actions["config"].config_class)
              if f.name != "command_options"}
    passthrough = {}
    for key, value in values.items():
        if key in actions and key not in _RESERVED:
            action = actions[key]
            action.default = _checked(command, path, key, action, value)
            action.required = False
        elif key in fields and key not in _RESERVED:
            passthrough[key] = _checked_field(command, path, key, fields[key], value)
        else:
            command.error(f"--config {path}: unknown key {key!r}: not an option of "
                          f"{command.prog} (keys are the option names with _ for -, e.g. "
                          f"batch_size for --batch-size)")
    command.set_defaults(**passthrough)


def _config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config F`` or ``--config=F``), if any."""
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]):
    """The (sub)parser ``argv`` selects: the command's, or its action's (``detect train``)."""
    found = None
    current = parser
    for token in argv:
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)),
                   None)
        if sub is None:
            break
        if token in sub.choices:
            current = found = sub.choices[token]
    return found


def _main_actions(command: argparse.ArgumentParser) -> dict:
    """Destination -> action of ``command``'s options, hidden deprecated aliases left out."""
    return {a.dest: a for a in command._actions
            if a.default is not argparse.SUPPRESS and not a.dest.startswith("_")}


def _checked(command, path: str, key: str, action: argparse.Action, value):
    """``value`` as the option would have parsed it, or a usage error naming what it takes."""
    def refuse(accepted: str):
        command.error(f"--config {path}: {key}: expected {accepted}, got {value!r}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            refuse("true or false")
        return value
    if value is None:
        if action.default is not None:
            refuse(_describe(action))
        return None
    if isinstance(action.nargs, int) or action.nargs in ("+", "*"):
        if not isinstance(value, list) or (isinstance(action.nargs, int)
                                           and len(value) != action.nargs):
            refuse(_describe(action))
        return [_scalar(action, item, refuse) for item in value]
    return _scalar(action, value, refuse)


def _scalar(action: argparse.Action, value, refuse):
    kind = action.type
    if isinstance(value, (list, dict)) or isinstance(value, bool):
        refuse(_describe(action))
    if kind is int:
        if not isinstance(value, int):
            refuse(_describe(action))
    elif kind is float:
        if not isinstance(value, (int, float)):
            refuse(_describe(action))
        value = float(value)
    elif kind is None or kind is str:
        if not isinstance(value, str):
            refuse(_describe(action))
    else:
        try:
            value = kind(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            refuse(_describe(action))
    if action.choices is not None and value not in action.choices:
        refuse("one of " + ", ".join(map(str, action.choices)))
    return value


def _describe(action: argparse.Action) -> str:
    kind = {int: "an integer", float: "a number"}.get(action.type, "a string")
    if isinstance(action.nargs, int):
        return f"a list of {action.nargs} values ({kind} each)"
    if action.nargs in ("+", "*"):
        return f"a list ({kind} each)"
    return kind + (" or null" if action.default is None else "")


def _checked_field(command, path: str, key: str, field: dataclasses.Field, value):
    """A config field without a flag (``betas``, ``model_kwargs``): the same kind of value as
    its default (anything plain where the default is None)."""
    default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
               else field.default)
    if default is None or default is dataclasses.MISSING:
        return value
    kinds = {bool: bool, int: (int,), float: (int, float), str: str, dict: dict,
             list: list, tuple: list}
    expected = next((k for t, k in kinds.items() if isinstance(default, t)), None)
    ok = expected is None or (isinstance(value, expected)
                              and (isinstance(default, bool) or not isinstance(value, bool)))
    if not ok:
        name = type(default).__name__.replace("tuple", "list")
        command.error(f"--config {path}: {key}: expected a {name} like {default!r}, "
                      f"got {value!r}")
    return value
