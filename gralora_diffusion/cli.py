"""`gralora-diffusion` command line. Each sub-command lives in `gralora_diffusion/commands/<name>.py`
with `HELP`, `add_arguments(parser)` and `run(args) -> int`; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import GraloraError

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
}


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
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional image backends we never use; keep the CLI quiet.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args) or 0
    except (GraloraError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line, always
        print(f"gralora-diffusion {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gralora-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
