"""How many CPU threads torch uses. On a busy machine torch's default (one thread per core) made
`train` and `generate` 9-40x slower than one thread: the tiny models' ops are too small to share
out, and every thread waits for the slowest core. We honour an explicit choice, then
OMP_NUM_THREADS, and otherwise use half the cores, at most 4.

The same rule holds for Python users: every entry point that runs models (`train`, `evaluate_adapter`,
`compare`, `generate_samples`, `tiny_world_pipeline`) calls `announce`, which applies it once per process
unless the user chose already (torch.set_num_threads, OMP_NUM_THREADS or MKL_NUM_THREADS), and says so
once. Importing the package changes nothing."""

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
_decided: list[bool] = []  # the choice is made once per process: by the command line, or by `announce`


def set_num_threads(requested: int | None = None) -> str:
    """Apply `choose_num_threads` to torch; returns a one-line note saying what was chosen, which
    `announce` prints once when the work starts (so a bad argument's error stays the only output)."""
    import torch

    threads, why = choose_num_threads(requested)
    torch.set_num_threads(threads)
    _note[:] = [f"CPU threads: {threads} ({why}; change with --num_threads N)"]
    _decided[:] = [True]
    return _note[0]


def user_chose_threads() -> bool:
    """Whether torch's intra-op thread count was chosen by someone: OMP_NUM_THREADS/MKL_NUM_THREADS set, or
    torch.set_num_threads called. Without those, torch starts intra-op and inter-op pools at the same size
    (both from its `defaultNumThreads`, the physical cores), so a differing intra-op count was set by hand."""
    import torch

    if any(os.environ.get(name, "").strip() for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return True
    return torch.get_num_threads() != torch.get_num_interop_threads()


def apply_default() -> None:
    """For Python callers: the command line's rule, once per process, unless the user chose already."""
    if _decided:
        return
    _decided[:] = [True]
    if user_chose_threads():
        return
    import torch

    before = torch.get_num_threads()
    threads, why = choose_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
        _note[:] = [f"CPU threads: {threads} ({why}, as the command line picks; torch's default was {before}. "
                    "Choose with torch.set_num_threads(N) or OMP_NUM_THREADS before the first call)"]


def announce(say=print) -> None:
    """Where models start to run: applies the thread rule if nobody chose (`apply_default`), and says the
    choice once (`say=None`: applied, said by a later call)."""
    apply_default()
    if _note and say:
        say(_note.pop())
