"""DreamBooth-style training of GraLoRA (or LoRA) adapters for SDXL, split by stage:
config (settings) -> data (images, captions, buckets, class images; hf_dataset: 🤗 datasets and
streams) -> model (base model, adapters,
optimizer) -> loss (one micro-batch) -> loop (the stages, under Accelerate) -> sampling (sample
images) and save (adapter, config, checkpoints).

`train` and `TrainResult` are imported on first use (PEP 562), so the command line can build its
flags from `train.config` without importing torch."""

from importlib import import_module

from ..errors import TrainConfigError, TrainingError
from .config import TrainConfig

__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "TrainingError", "train"]


def __getattr__(name: str):
    if name in ("train", "TrainResult"):
        value = getattr(import_module(".loop", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
