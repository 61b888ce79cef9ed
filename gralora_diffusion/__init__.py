"""gralora-diffusion: GraLoRA (Granular Low-Rank Adaptation) adapters for diffusers pipelines (SDXL, SD 1.5,
SD 3.5, FLUX.1, FLUX.2 [klein], Qwen-Image: the families in `bases/`).

Names are imported on first use (PEP 562), so `import gralora_diffusion` and the command line's
`--help` stay fast and do not import torch/diffusers until something needs them.
"""

from importlib import import_module

from .errors import AdapterFileError, GraloraConfigError, GraloraError
from .quiet import drop_import_noise

drop_import_noise()  # before diffusers imports torchao / bitsandbytes, whose import logs CPU-build noise

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "adapter_file": None,  # the module itself
    "TEXT_ENCODER_PRESETS": "bases.sdxl",
    "UNET_PRESETS": "bases.sdxl",
    "tiny_pipeline": "bases",
    "load_base": "bases",
    "get_family": "bases",
    "FAMILY_NAMES": "bases",
    "add_gralora": "inject",
    "GraloraLinear": "layer",
    "WEIGHT_NAME": "constants",
    "AdapterFile": "adapter_file",
    "read_adapter_file": "adapter_file",
    "save_adapter_file": "adapter_file",
    "GraloraLoaderMixin": "loader",
    "GraloraStableDiffusionXLPipeline": "loader",
    "patch_pipeline": "loader",
    "adapter_summary": "summary",
    "format_summary": "summary",
    "save_tiny_sdxl": "tiny",
    "tiny_sdxl_pipeline": "tiny",
    "tiny_world_pipeline": "world.model",
    "save_world_sdxl": "world.model",
    "WorldEvaluator": "world.evaluator",
    "ExportError": "export",
    "ExportReport": "export",
    "export_lora": "export",
    "adapter_info": "info",
    "format_info": "info",
    "GenerateResult": "generate",
    "generate_samples": "generate",
    "HubError": "hub",
    "push_to_hub": "hub",
    "files_to_push": "hub",
    "evaluate_adapter": "evaluate",
    "EvaluationResult": "evaluate",
    "load_any_adapter": "any_adapter",
    "per_image_adapters": "mixed_batch",
    "save_tiny_scorers": "tiny_scorers",
    "save_model_card": "hub",
}

__all__ = ["AdapterFileError", "GraloraConfigError", "GraloraError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'gralora_diffusion' has no attribute {name!r}")
    module = import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
