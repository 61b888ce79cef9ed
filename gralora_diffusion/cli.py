"""`gralora-diffusion` command line. Each sub-command lives in `gralora_diffusion/commands/<name>.py`
with `HELP`, `add_arguments(parser)` and `run(args) -> int`; this file only dispatches."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from . import threads
from .failures import expected_errors, one_line

# command name -> module under gralora_diffusion.commands
COMMANDS = {
    "quickstart": "quickstart",
    "train": "train",
    "generate": "generate",
    "export-lora": "export_lora",
    "info": "info",
    "push": "push",
    "make-tiny": "make_tiny",
    "evaluate": "evaluate",
    "compare": "compare",
}
# Commands that run models on the CPU: they choose torch's thread count and say so.
COMPUTE_COMMANDS = {"quickstart", "train", "generate", "export-lora", "evaluate", "compare"}


def _available_commands() -> dict:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"gralora_diffusion.commands.{module_name}")
        except ModuleNotFoundError as err:
            if err.name != f"gralora_diffusion.commands.{module_name}":
                raise
    return modules


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gralora-diffusion",
        description="Train, use and share GraLoRA adapters for Stable Diffusion XL.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _available_commands().items():
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name in COMPUTE_COMMANDS:
            threads.add_argument(command_parser)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Misspelled flags: name the closest real flag of the sub-command and point to its --help; exit 2."""
    args, extras = parser.parse_known_args(argv)
    unknown = [word for word in extras if word.startswith("-")]
    if not extras:
        return
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    flags = [flag for action in sub._actions for flag in action.option_strings if action.help != argparse.SUPPRESS]
    hints = []
    for word in unknown or extras:
        name = word.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6) or difflib.get_close_matches(
            name.replace("-", "_"), flags, n=1, cutoff=0.6)
        hints.append(f"{word!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    sub.exit(2, f"{sub.prog}: error: unrecognized argument{'s' * (len(hints) > 1)}: {', '.join(hints)} "
                f"(see `{sub.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional image backends we never use; keep the CLI quiet.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    _unknown_flags(parser, argv)
    args = parser.parse_args(argv)
    try:
        if args.command in COMPUTE_COMMANDS:
            threads.set_num_threads(args.num_threads)  # said by threads.announce() when models start to load
        return args._run(args) or 0
    except BrokenPipeError:  # `gralora-diffusion info ... | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would report the pipe again when it flushes at exit
        return 0
    except KeyboardInterrupt:
        print(f"gralora-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the error edge (failures.py) decides; anything else re-raised
        if args.debug or not isinstance(err, expected_errors()):
            raise
        print(f"gralora-diffusion {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
