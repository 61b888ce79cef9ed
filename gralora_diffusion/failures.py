"""The one error edge of the command line (`gralora-diffusion` and the training script): which errors
become one line and exit code 2, and that line.

Ours (`GraloraError`), every `OSError` (with the path it names: a read-only or full disk, a name too
long, a missing file), `MemoryError`, and the library errors we can name (a decompression bomb, a
damaged safetensors file, a bad YAML file, torch's out-of-memory, the Hub's HTTP and offline errors).
Anything else is a bug and keeps its traceback. Nothing here imports a library: only the ones already
loaded can have raised.
"""

from __future__ import annotations

import sys

from .errors import GraloraError

# module -> exception class names that are about the input or the machine, not about our code
LIBRARY_ERRORS = {
    "PIL.Image": ("DecompressionBombError",),
    "safetensors": ("SafetensorError",),
    "yaml": ("YAMLError",),
    "torch": ("OutOfMemoryError",),
    "huggingface_hub.errors": ("HfHubHTTPError", "OfflineModeIsEnabled", "HFValidationError", "LocalEntryNotFoundError"),
}


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that end a command with one line and exit 2."""
    found: list[type[BaseException]] = [GraloraError, OSError, MemoryError]
    for module, names in LIBRARY_ERRORS.items():
        loaded = sys.modules.get(module)
        found += [getattr(loaded, name) for name in names if loaded is not None and isinstance(getattr(loaded, name, None), type)]
    return tuple(found)


def one_line(err: BaseException) -> str:
    """The error as one line: an OSError names its path(s) and cause; a MemoryError says what to lower."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        detail = " ".join(str(err).split())[:200]
        return (f"out of memory{f' ({detail})' if detail else ''}: lower --resolution, the batch size or the rank, "
                "or use a machine with more memory.")
    if isinstance(err, OSError) and not isinstance(err, GraloraError) and err.filename is not None and err.strerror:
        paths = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 is not None else "")
        return f"{paths}: {err.strerror}; check the path, its permissions and the free disk space."
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if isinstance(err, GraloraError) else f"{text} ({type(err).__name__})"
