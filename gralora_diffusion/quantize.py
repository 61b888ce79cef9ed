"""A quantized frozen base: `--quantize_base {none,int8,nf4,fp8}` as diffusers' own quantization configs.

One rule for every base: `pipeline_quantization(mode, components)` is a diffusers
`PipelineQuantizationConfig` with one config per component, and every quantized weight is made by
diffusers' `from_pretrained(..., quantization_config=...)`. A Hub id or folder gets the config when it
loads (the full-precision weights are never all in memory); the embedded `tiny` / `world` bases, built
in memory, are written to a temporary folder and loaded back through the same configs
(`quantize_loaded`). Backends, by option:

- `int8`: torchao `Int8WeightOnlyConfig` (per-row int8 weights) through diffusers' / transformers'
  `TorchAoConfig`; runs on CPU and CUDA.
- `fp8`: torchao `Float8WeightOnlyConfig` (float8_e4m3 weights, per-row scale), the same way; CPU and CUDA.
- `nf4`: bitsandbytes 4-bit NF4 through `BitsAndBytesConfig`; diffusers' bitsandbytes quantizer needs a
  CUDA/XPU/MPS device (it refuses a CPU-only machine), so nf4 is refused on CPU before any model loads.

The layers stay what the backends make (torchao: an `nn.Linear` whose weight is a tensor subclass;
bitsandbytes: `Linear4bit`); GraLoRA wraps them like any Linear and takes the base output from their
own forward (layer.py). Fusing into a quantized weight is refused (loader.py): see `check_fusable`.
"""

from __future__ import annotations

import shutil
import tempfile

from .constants import QUANTIZE_CHOICES
from .errors import GraloraConfigError

# torch is imported inside the functions: the CLI's parser adds --quantize_base from here, cheaply.
BACKENDS = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}
EXTRA = 'pip install "gralora-diffusion[quant]"'


def add_argument(parser) -> None:
    """The one --quantize_base flag of train (through TrainConfig), compare, generate and evaluate."""
    parser.add_argument("--quantize_base", "--quantize-base", choices=QUANTIZE_CHOICES, default="none",
                        help="quantize the frozen base as it loads: int8 / fp8 (torchao; CPU and CUDA), nf4 (bitsandbytes; "
                             "GPU only); the UNet and the text encoders (default none)")


def check_quantize_base(mode, what: str = "--quantize_base", error=GraloraConfigError, device=None) -> str:
    """The option, checked before any model loads: a known choice, its library installed, a device it
    runs on. Returns the mode; raises `error` with one line naming `what` otherwise."""
    mode = "none" if mode is None else str(mode)
    if mode not in QUANTIZE_CHOICES:
        raise error(f"{what} {mode!r}: pick one of {', '.join(QUANTIZE_CHOICES)}.")
    if mode == "none":
        return mode
    backend = BACKENDS[mode]
    try:
        __import__(backend)
    except ImportError:
        raise error(f"{what} {mode} needs {backend}, which is not installed: {EXTRA}.") from None
    if mode == "nf4":
        import torch

        device = torch.device(device) if device is not None else None
        has_gpu = torch.cuda.is_available() or torch.xpu.is_available() or torch.mps.is_available()
        if not has_gpu or (device is not None and device.type == "cpu"):
            raise error(f"{what} nf4: diffusers' bitsandbytes quantizer needs a CUDA/XPU/MPS device and this run is on "
                        "CPU; use int8 or fp8 (torchao) on CPU.")
    return mode


def _component_config(mode: str, transformers_model: bool):
    """The quantization config of one component, from its library (diffusers or transformers)."""
    import torch

    if mode == "nf4":
        if transformers_model:
            from transformers import BitsAndBytesConfig
        else:
            from diffusers import BitsAndBytesConfig
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    quant_type = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
    if transformers_model:
        from transformers import TorchAoConfig
    else:
        from diffusers import TorchAoConfig
    return TorchAoConfig(quant_type=quant_type)


def quantized_components(family, trained_text_encoders: bool) -> tuple[str, ...]:
    """What a quantized base of `family` (bases.Family) quantizes: the denoiser, and the text encoders
    when they are not trained."""
    return (family.denoiser,) if trained_text_encoders else (family.denoiser, *family.text_encoders)


def pipeline_quantization(mode: str, components=("unet", "text_encoder", "text_encoder_2")):
    """diffusers' `PipelineQuantizationConfig` for `mode` over `components` (None for "none")."""
    if check_quantize_base(mode) == "none":
        return None
    from diffusers import PipelineQuantizationConfig

    mapping = {c: _component_config(mode, transformers_model=c.startswith("text_encoder")) for c in components}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def load_quantized_model(model_class, folder, config, torch_dtype, **kwargs):
    """`model_class.from_pretrained(folder, **kwargs)` with one component's quantization config, quietly."""
    from .quiet import quiet_libraries

    with quiet_libraries():
        return model_class.from_pretrained(str(folder), quantization_config=config, torch_dtype=torch_dtype, **kwargs)


def quantize_loaded(pipe, quantization):
    """Quantize the components of a pipeline built in memory (the embedded bases) by the same configs a
    Hub base loads with: each component written to a temporary folder and loaded back through
    diffusers' / transformers' `from_pretrained(..., quantization_config=...)`. Returns the pipeline."""
    if quantization is None:
        return pipe
    for component, config in quantization.quant_mapping.items():
        model = getattr(pipe, component, None)
        if model is None or is_quantized_model(model):
            continue
        folder = tempfile.mkdtemp(prefix=f"gralora-quantize-{component}-")
        try:
            model.save_pretrained(folder)
            quantized = load_quantized_model(type(model), folder, config, model.dtype)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        pipe.register_modules(**{component: quantized})
    return pipe


def is_quantized_weight(weight) -> bool:
    """A weight a backend owns (torchao tensor subclass, bitsandbytes Params4bit / Int8Params)."""
    import torch
    import torch.nn as nn

    return weight is not None and type(weight) not in (torch.Tensor, nn.Parameter)


def is_quantized_model(model) -> bool:
    import torch.nn as nn

    return bool(getattr(model, "is_quantized", False)) or any(
        is_quantized_weight(getattr(m, "weight", None)) for m in model.modules() if isinstance(m, nn.Linear))


def quantization_name(model) -> str:
    """'int8' / 'fp8' / 'nf4' / a backend's class name, or 'none': what a model's Linears hold."""
    import torch.nn as nn

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and is_quantized_weight(weight):
            name = type(weight).__name__
            return {"Int8Tensor": "int8", "Float8Tensor": "fp8", "Params4bit": "nf4"}.get(name, name)
    return "none"


def weight_bytes(model) -> int:
    """Bytes the model's parameters and buffers hold, a quantized tensor counted by its inner tensors
    (its `numel() * element_size()` is the full-precision size it stands for)."""
    import torch.nn as nn

    def size(t) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += size(t.data if type(t) is nn.Parameter else t)
    return total


def check_fusable(layer, where: str) -> None:
    """Fusing an adapter into a quantized weight would need dequantize, add, requantize: a second
    rounding of the base that unfuse cannot undo, and PEFT refuses it for everything but LoRA.
    We refuse it in one line, before any weight changes."""
    weight = getattr(layer.get_base_layer(), "weight", None)
    if is_quantized_weight(weight):
        raise GraloraConfigError(
            f"{where}: the base weight is quantized ({type(weight).__name__}); fusing GraLoRA into it would "
            "requantize the base and lose precision. Nothing was fused; run the adapter unfused (it costs "
            "little at inference), or load the base with --quantize_base none to fuse.")
