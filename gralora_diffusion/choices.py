"""Choices whose list belongs to a library (diffusers' LR scheduler names, ...): checked after the
command line is parsed and before any model loads, against the library's own list. The table is plain
data, so building the CLI's parser imports none of these libraries; the check imports the one it needs.
"""

from __future__ import annotations

import difflib
import importlib

# setting name -> "module:Enum" whose values are the accepted spellings
LIBRARY_CHOICES: dict[str, str] = {
    "lr_scheduler": "diffusers.optimization:SchedulerType",
}


def library_choices(name: str) -> list[str]:
    """The accepted values of setting `name`, read from the library."""
    module, _, attribute = LIBRARY_CHOICES[name].partition(":")
    return [member.value for member in getattr(importlib.import_module(module), attribute)]


def check_choices(settings: dict, error: type[Exception] | None = None) -> None:
    """Each setting of `settings` named in LIBRARY_CHOICES is one of the library's values, or `error`
    naming the flag, the closest value and the list."""
    if error is None:
        from .errors import GraloraConfigError as error
    for name in LIBRARY_CHOICES:
        value = settings.get(name)
        if value is None:
            continue
        allowed = library_choices(name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise error(f"--{name} {value!r}: not a choice ({hint}choose one of {', '.join(allowed)}).")
