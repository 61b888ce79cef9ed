"""Bounds on what a settings file (`--config`: TOML, YAML or JSON) may cost to read: at most
`MAX_BYTES` on disk, and a YAML file's anchors and aliases may not expand to more than `MAX_NODES`
values (a "billion laughs" file is a few hundred bytes that expand to 10**9 strings) or nest deeper
than `MAX_DEPTH`. Checked while reading, before anything else looks at the values."""

from __future__ import annotations

from pathlib import Path

MAX_BYTES = 1_000_000
MAX_NODES = 100_000
MAX_DEPTH = 50


def read_bounded(path: Path, error: type[Exception]) -> str:
    """The file's text, or `error` when it is larger than MAX_BYTES (read no further than that)."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise error(f"--config {path}: larger than {MAX_BYTES:,} bytes; a settings file is a short table of flags.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"--config {path}: not valid UTF-8 (byte {err.start}); save it as UTF-8.") from None


def check_expansion(data, path, error: type[Exception]) -> None:
    """Walk the loaded values as a reader would (aliases expanded), stopping at MAX_NODES / MAX_DEPTH."""
    budget = [MAX_NODES]

    def walk(value, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise error(f"--config {path}: expands to more than {MAX_NODES:,} values (YAML anchors and aliases?); "
                        "write the settings out plainly.")
        if depth > MAX_DEPTH:
            raise error(f"--config {path}: nested deeper than {MAX_DEPTH} levels; settings are a flat table.")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
        for child in children:
            walk(child, depth + 1)

    walk(data, 0)
