"""Running a pipeline's own `encode_prompt` on the trainer's text encoders."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def text_encoders_in(pipe, names, encoders):
    """Within the block, the pipeline's attributes `names` are `encoders` (the trainer's wrapped ones),
    so `pipe.encode_prompt` runs them; restored after. Set in the instance dict: the pipeline's
    __setattr__ would rewrite its config for a swap this short. `encoders` None or empty: no change."""
    if not encoders:
        yield
        return
    saved = {name: pipe.__dict__[name] for name in names}
    try:
        pipe.__dict__.update(zip(names, encoders))
        yield
    finally:
        pipe.__dict__.update(saved)
