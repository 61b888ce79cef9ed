"""What every family's tiny builder does last, written once."""

from __future__ import annotations


def finish_tiny(pipe, sample_size: int | None = None):
    """Every model in eval mode, no progress bar; `sample_size` (latent side) for the DiT pipelines whose
    default is the real model's: 8 renders 64 px in memory, as the other tiny families (not saved: a
    folder renders the pipeline's default)."""
    import torch.nn as nn

    for part in pipe.components.values():
        if isinstance(part, nn.Module):
            part.eval()
    if sample_size is not None:
        pipe.default_sample_size = sample_size
    pipe.set_progress_bar_config(disable=True)
    return pipe
