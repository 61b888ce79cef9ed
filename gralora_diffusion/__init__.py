"""gralora-diffusion: GraLoRA (Granular Low-Rank Adaptation) adapters for Stable Diffusion XL."""

from . import adapter_file
from .errors import AdapterFileError, GraloraConfigError, GraloraError
from .inject import TEXT_ENCODER_PRESETS, UNET_PRESETS, add_gralora
from .layer import GraloraLinear
from .adapter_file import WEIGHT_NAME, AdapterFile, read_adapter_file, save_adapter_file
from .loader import GraloraLoaderMixin, GraloraStableDiffusionXLPipeline, patch_pipeline
from .summary import adapter_summary, format_summary
from .tiny import save_tiny_sdxl, tiny_sdxl_pipeline
from .export import ExportError, ExportReport, export_lora
from .info import adapter_info, format_info
from .generate import GenerateResult, generate_samples
from .hub import HubError, push_to_hub, save_model_card

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "GraloraConfigError",
    "GraloraError",
    "GraloraLinear",
    "AdapterFile",
    "GraloraLoaderMixin",
    "GraloraStableDiffusionXLPipeline",
    "WEIGHT_NAME",
    "patch_pipeline",
    "read_adapter_file",
    "save_adapter_file",
    "TEXT_ENCODER_PRESETS",
    "UNET_PRESETS",
    "adapter_summary",
    "add_gralora",
    "format_summary",
    "save_tiny_sdxl",
    "tiny_sdxl_pipeline",
    "ExportError",
    "ExportReport",
    "export_lora",
    "adapter_info",
    "format_info",
    "GenerateResult",
    "generate_samples",
    "HubError",
    "push_to_hub",
    "save_model_card",
]
