"""How many CPU threads torch uses. On a busy machine torch's default (one thread per core) made
`train` and `generate` 9-40x slower than one thread: the tiny models' ops are too small to share
out, and every thread waits for the slowest core. We honour an explicit choice, then
OMP_NUM_THREADS, and otherwise use half the cores, at most 4."""

from __future__ import annotations

import os

from .errors import GraloraConfigError


NUM_THREADS_HELP = "CPU threads for torch (default: OMP_NUM_THREADS, else half the cores, at most 4)"


def add_argument(parser) -> None:
    """`--num_threads N` for a command that runs models (the CLI's and the training script's)."""
    parser.add_argument("--num_threads", type=int, default=None, help=NUM_THREADS_HELP)


def choose_num_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, where the number came from): --num_threads, else OMP_NUM_THREADS, else the default."""
    if requested is not None:
        from .numbers import limited

        return limited("num_threads", requested, "--num_threads", GraloraConfigError), "--num_threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        if env.isdigit() and 1 <= int(env) <= 1024:
            return int(env), "OMP_NUM_THREADS"
        raise GraloraConfigError(f"OMP_NUM_THREADS={env!r}: set it to a whole number in [1, 1024], or unset it.")
    return max(1, min(4, (os.cpu_count() or 2) // 2)), "default: half the cores, at most 4"


_note: list[str] = []  # what set_num_threads chose, said once by `announce` when the real work starts


def set_num_threads(requested: int | None = None) -> str:
    """Apply `choose_num_threads` to torch; returns a one-line note saying what was chosen, which
    `announce` prints once when the work starts (so a bad argument's error stays the only output)."""
    import torch

    threads, why = choose_num_threads(requested)
    torch.set_num_threads(threads)
    _note[:] = [f"CPU threads: {threads} ({why}; change with --num_threads N)"]
    return _note[0]


def announce(say=print) -> None:
    """Say the thread choice once, if the command line made one; called where models start to load."""
    if _note:
        say(_note.pop())
