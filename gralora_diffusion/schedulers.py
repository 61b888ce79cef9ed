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


def use_scheduler(pipe, name: str) -> None:
    """Swap `pipe.scheduler` for diffusers' `name`, configured from the current one."""
    cls = scheduler_class(name)
    fits = sorted(c.__name__ for c in getattr(pipe.scheduler, "compatibles", []))
    if fits and cls.__name__ not in fits:
        raise GraloraConfigError(f"--scheduler {name}: does not fit this base's {type(pipe.scheduler).__name__}; "
                                 f"pick one of {', '.join(fits)}.")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
