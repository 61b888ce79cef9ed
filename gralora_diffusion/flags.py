"""The one flag style of every parser we build (the CLI, its sub-commands, scripts/): flags are
declared and shown in snake_case, as diffusers' training scripts write them, and every flag also
answers to its kebab-case spelling (`--output-dir` = `--output_dir`, `--no-random-flip` =
`--no-random_flip`) without a second name in `--help`.

Done once here, in the parser class, so a flag any module adds later gets its alias with no code of
its own: `add_argument` rewrites declared names to snake_case, and `parse_known_args` (argparse calls
it for each sub-command's parser too) maps any spelling of a known flag to its declared name.
Nothing here imports more than argparse: building the parser must stay cheap (`--help`)."""

from __future__ import annotations

import argparse


def snake(option: str) -> str:
    """`--output-dir` -> `--output_dir`; the `--no-` of argparse's BooleanOptionalAction is kept."""
    if not option.startswith("--"):
        return option
    prefix = "--no-" if option.startswith("--no-") else "--"
    return prefix + option[len(prefix):].replace("-", "_")


def spelling_key(option: str) -> str:
    """The form every spelling of one flag shares: dashes and underscores are the same."""
    return option.replace("_", "-")


class FlagParser(argparse.ArgumentParser):
    """argparse with snake_case flags, kebab-case aliases, and usage errors in one line (exit code 2)."""

    def add_argument(self, *names, **kwargs):
        seen = []
        for name in (snake(n) for n in names):
            if name not in seen:
                seen.append(name)
        return super().add_argument(*seen, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        import sys

        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self.canonical_argv(args), namespace)

    def canonical_argv(self, argv: list[str]) -> list[str]:
        """Each `--word[=value]` that names one of this parser's flags in another spelling, as declared.
        Unknown words stay as typed, so the error shows what the user wrote; `--` ends the flags."""
        known = {spelling_key(option): option for option in self._option_string_actions if option.startswith("--")}
        out = []
        for i, word in enumerate(argv):
            if word == "--":
                return out + argv[i:]
            if self._subparsers is not None and not word.startswith("-") and self._is_command(word):
                return out + argv[i:]  # the rest belongs to the sub-command's parser
            name, eq, value = word.partition("=")
            option = known.get(spelling_key(name)) if word.startswith("--") else None
            out.append(option + eq + value if option else word)
        return out

    def _is_command(self, word: str) -> bool:
        return any(word in getattr(action, "choices", None) or () for action in self._subparsers._group_actions)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
