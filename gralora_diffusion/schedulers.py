"""`generate --scheduler NAME`: diffusers' schedulers by class name (EulerAncestralDiscreteScheduler,
DPMSolverMultistepScheduler, ...), built from the pipeline's own scheduler config, as diffusers' docs
swap them (`Cls.from_config(pipe.scheduler.config)`). The name is checked before any model loads; that
the scheduler fits the base (its `compatibles`) is checked once the base is loaded."""

from __future__ import annotations

import difflib

from .errors import GraloraConfigError


def scheduler_class(name: str):
    """The diffusers scheduler class called `name`; a one-line error with the closest names otherwise."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return cls
    names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and n[0].isupper())
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"Did you mean {', '.join(close)}? " if close else ""
    raise GraloraConfigError(f"--scheduler {name!r}: not a diffusers scheduler. {hint}"
                             "Give a class name such as EulerDiscreteScheduler or DPMSolverMultistepScheduler.")


def check_steps(pipe, steps: int, flag: str = "--num_inference_steps") -> None:
    """Steps the pipeline's scheduler can run. A flow-matching schedule stretched to a terminal sigma
    (`shift_terminal`: Qwen-Image) divides by zero with one step and every image is NaN (diffusers
    0.42's `stretch_shift_to_terminal`), so one step is refused there, before anything is generated."""
    scheduler = getattr(pipe, "scheduler", None)
    if steps < 2 and getattr(getattr(scheduler, "config", None), "get", lambda *_: None)("shift_terminal"):
        raise GraloraConfigError(f"{flag} {steps}: {type(scheduler).__name__} with shift_terminal (this base's schedule) "
                                 "needs at least 2 steps (one step gives NaN images); give 2 or more.")


def use_scheduler(pipe, name: str) -> None:
    """Swap `pipe.scheduler` for diffusers' `name`, configured from the current one."""
    cls = scheduler_class(name)
    fits = sorted(c.__name__ for c in getattr(pipe.scheduler, "compatibles", []))
    if fits and cls.__name__ not in fits:
        raise GraloraConfigError(f"--scheduler {name}: does not fit this base's {type(pipe.scheduler).__name__}; "
                                 f"pick one of {', '.join(fits)}.")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
