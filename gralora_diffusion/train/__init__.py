"""DreamBooth-style training of GraLoRA (or LoRA) adapters for SDXL, split by stage:
config (settings) -> data (images, captions, buckets, class images; hf_dataset: 🤗 datasets and
streams) -> model (base model, adapters,
optimizer) -> loss (one micro-batch) -> loop (the stages, under Accelerate) -> sampling (sample
images) and save (adapter, config, checkpoints)."""

from ..errors import TrainConfigError, TrainingError
from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "TrainingError", "train"]
