"""Names and tables the whole package shares, defined once. No torch import here: the CLI reads
these before it loads anything heavy; `torch_dtype` resolves dtype names on first use."""

from __future__ import annotations

# Every component an adapter can live in, in file order: the union of the families' `_lora_loadable_modules`
# (bases/; tests check each registered family against it). A pipeline's own are its `_lora_loadable_modules`.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")

# File names.
WEIGHT_NAME = "pytorch_gralora_weights.safetensors"  # our adapter file
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"  # PEFT's save_pretrained layout
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "training_config.yaml"
STATE_NAME = "training_state.json"
CARD_NAME = "README.md"
GENERATE_OUTPUT_DIR = "generated"  # generate's default folder (never a training set: see generate.check_output_dir)

# DreamBooth's metric models (evaluate, compare, train --validation_metrics).
DEFAULT_DINO_MODEL = "facebook/dino-vits16"  # DreamBooth's DINO ViT-S/16
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"

# compare's default variants: GraLoRA, Hybrid GraLoRA and LoRA at the same parameter count ((r + hybrid_r)(in + out)).
DEFAULT_VARIANTS = ("gralora:r=8,k=2", "gralora:r=4,k=2,hybrid_r=4", "lora:r=8")
# Instance images that fidelity metrics compare with when they come from a dataset (the first rows), at most.
REFERENCE_IMAGES = 64

# Suffixes of files we never unpickle, and of images we read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# --quantize_base choices (gralora_diffusion/quantize.py maps each to a diffusers quantization config).
QUANTIZE_CHOICES = ("none", "int8", "nf4", "fp8")

# dtype names a user may write, to torch's attribute names.
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16"}


def torch_dtype(value, error=None, what: str = "dtype"):
    """'fp16' / 'bf16' / 'fp32' (torch's long names, any case, or one of those torch dtypes) ->
    torch.dtype. Anything else raises `error` (default GraloraConfigError) naming `what`."""
    import torch

    if isinstance(value, torch.dtype) and value in (torch.float32, torch.float16, torch.bfloat16):
        return value
    if isinstance(value, str) and value.lower() in DTYPE_NAMES:
        return getattr(torch, DTYPE_NAMES[value.lower()])
    if error is None:
        from .errors import GraloraConfigError as error
    raise error(f"{what}={value!r}: pick one of fp32, fp16, bf16.")
