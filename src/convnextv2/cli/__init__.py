"""The ``convnextv2`` command. Each subcommand lives in its own module of this package with
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under convnextv2.cli; modules import lazily so --help stays fast.
COMMANDS = {
    "info": "info",
    "bench": "bench",
    "convert": "convert",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "eval": "eval",
    "predict": "predict",
    "export": "export",
    "demo": "demo",
    "analyze": "analyze",
    "reconstruct": "reconstruct",
    "detect": "detect",
    "segment": "segment",
    "shards": "shards",
    "launch": "launch",
    "push": "push",
}

EPILOG = """examples:
  convnextv2 info --model convnextv2_atto --img-size 224
  convnextv2 convert convnextv2_atto_1k_224_ema.pt atto.safetensors --to native
  convnextv2 pretrain --model convnextv2_atto --data ./images --output runs/fcmae
run `convnextv2 COMMAND --help` for the options of each command."""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def _load(name: str):
    return importlib.import_module(f"convnextv2.cli.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    from ._guard import OneLineErrorParser  # usage errors: one line, not the usage block
    parser = OneLineErrorParser(
        prog="convnextv2", description="ConvNeXt V2 models and FCMAE pretraining.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           epilog=getattr(module, "EPILOG", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _no_tqdm_monitor() -> None:
    """No tqdm monitor thread: that daemon thread writes to stderr on its own clock, and when
    it holds stderr's lock as the interpreter shuts down (a Ctrl-C, an error exit) Python
    aborts ("could not acquire lock ... at interpreter shutdown", exit -6). The bars still
    refresh on every update."""
    from tqdm import tqdm
    tqdm.monitor_interval = 0


def main(argv: list[str] | None = None) -> int:
    from ._config_file import parse_command_line  # --config FILE.yaml: the file's defaults
    parser = build_parser()
    args = parse_command_line(parser, argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from ._guard import check_device, one_line, report_error
    _no_tqdm_monitor()
    from ..data.image_limits import max_image_pixels, set_max_image_pixels
    limit_before = max_image_pixels()  # put back at the end: a command's limit ends with it
    try:
        check_device(getattr(args, "device", None))
        from ._common import apply_max_image_pixels
        apply_max_image_pixels(args)  # --max-image-pixels, on the commands that read images
        return int(args._run(args) or 0)
    except (CLIError, ValueError, OSError) as e:  # OSError: missing, unwritable, full disk
        return report_error(args.command, e)
    except (FloatingPointError, RuntimeError) as e:  # a training failure: exit 1
        from ..training.loop import TRAINING_FAILURES  # non-finite loss, full disk
        if not isinstance(e, TRAINING_FAILURES):
            raise
        print(f"convnextv2 {args.command}: stopped: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"convnextv2 {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        set_max_image_pixels(limit_before)


if __name__ == "__main__":
    sys.exit(main())
