"""Key names of an exported LoRA: diffusers' (`<component>.<path>.lora_A.weight`) and kohya's.

kohya keys use the original SDXL (sgm) UNet layout that kohya's sd-scripts, ComfyUI and A1111
name: `down_blocks.b.attentions.l` -> `input_blocks_{1 + b(L+1) + l}_1`, `mid_block.attentions.0`
-> `middle_block_1`, `up_blocks.b.attentions.l` -> `output_blocks_{b(L+1) + l}_1` (L = the UNet's
layers_per_block, 2 for SDXL), the exact inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`.
The kohya renames themselves are diffusers' `convert_state_dict_to_kohya`; the sgm block map is ours.
"""

from __future__ import annotations

import re

import torch

from .adapter_file import AdapterFile
from .errors import ExportError

SDXL_LAYERS_PER_BLOCK = 2

_UNET_ATTENTION = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")


def sgm_unet_module(module: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> original SDXL (sgm) path, e.g. with layers_per_block=2
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`."""
    step = layers_per_block + 1
    if module.startswith("mid_block.attentions.0."):
        return "middle_block.1." + module[len("mid_block.attentions.0.") :]
    match = _UNET_ATTENTION.match(module)
    if match is None:
        raise ExportError(
            f"unet.{module}: kohya keys are written for Linear layers inside the UNet's attention blocks "
            "(to_q/k/v/out, ff, proj_in/out); this module has no SDXL (sgm) name here. Export with format='diffusers'."
        )
    kind, block, layer, rest = match[1], int(match[2]), int(match[3]), match[4]
    if kind == "down_blocks":
        if layer >= layers_per_block:
            raise ExportError(f"unet.{module}: down block layer {layer} does not exist with layers_per_block={layers_per_block}.")
        index, name = 1 + block * step + layer, "input_blocks"
    else:
        if layer > layers_per_block:
            raise ExportError(f"unet.{module}: up block layer {layer} does not exist with layers_per_block={layers_per_block}.")
        index, name = block * step + layer, "output_blocks"
    if index >= 10:
        # diffusers' converter finds the keys of block 1 by substring, so `input_blocks_1` would
        # also take `input_blocks_10..19`. SDXL stops at 8.
        raise ExportError(
            f"unet.{module} would be {name}_{index}: diffusers' kohya converter cannot tell block indices >= 10 "
            "from 1x (a UNet deeper than SDXL's). Export with format='diffusers'."
        )
    return f"{name}.{index}.1.{rest}"


def module_path(component: str, module: str, format: str, layers_per_block: int | None = None) -> str:
    """The module's path in the exported file: kohya's UNet in the sgm layout, text encoders with CLIP's
    `text_model.` (diffusers strips it for models without it, ComfyUI expects it) in both formats."""
    if format == "kohya" and component == "unet":
        return sgm_unet_module(module, layers_per_block)
    return diffusers_module(component, module)


def to_kohya(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' `convert_state_dict_to_kohya` (the lora_down/up, lora_te1/te2/unet and `_` renames)
    on `<component>.<path>.lora_A/B.weight` keys. Its alpha tensors are int64; ours are float32 whatever
    the weights' dtype, as kohya's sd-scripts writes them: bf16 cannot hold a rank such as 514 (it
    becomes 512, so loaders would scale by 0.9961). The value is the rank: alpha/rank = 1."""
    from diffusers.utils import convert_state_dict_to_kohya

    converted = convert_state_dict_to_kohya(state_dict)
    return {key: torch.tensor(float(t), dtype=torch.float32) if key.endswith(".alpha") else t for key, t in converted.items()}


def kohya_key(component: str, module: str, layers_per_block: int) -> str:
    """`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`, ..."""
    path = module_path(component, module, "kohya", layers_per_block)
    names = to_kohya({f"{component}.{path}.lora_A.weight": torch.zeros(1, 1)})
    return next(iter(names)).removesuffix(".lora_down.weight")


def diffusers_module(component: str, module: str) -> str:
    """Text-encoder paths with CLIP's `text_model.` (diffusers strips it for models without it, ComfyUI expects it)."""
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        return "text_model." + module
    return module


def resolve_layers_per_block(adapter: AdapterFile, layers_per_block: int | None) -> int | None:
    """The UNet's layers_per_block: given; else from the base model's UNet config when it is on this
    machine (a folder, the embedded tiny model, or the Hub cache); else read off the adapter's names,
    only where that is unambiguous (`_layers_from_names`). Otherwise refused: a guess writes kohya
    names for the wrong modules. None when the adapter has no UNet part (the names do not need it)."""
    if layers_per_block is not None:
        return int(layers_per_block)
    if "unet" not in adapter.state_dicts:
        return None
    config = _base_unet_config(adapter.base_model) if adapter.base_model else None
    if config is not None:
        return _unet_layers(config)
    inferred = _layers_from_names(adapter)
    if inferred is None:
        raise ExportError(
            f"{adapter.source}: kohya names need the UNet's layers_per_block, and it cannot be told for sure: the base "
            f"model ({adapter.base_model or 'not recorded'}) is not on this machine and the adapter's targets do not cover "
            "every attention of the up blocks. Pass --layers-per-block N (layers_per_block=N; SDXL: 2), or export with "
            "--format diffusers."
        )
    return inferred


def _layers_from_names(adapter: AdapterFile) -> int | None:
    """An up block has layers_per_block + 1 attentions, a down block layers_per_block. When the UNet
    targets are plain module names (matched in every block, as the presets are), the adapter covers
    all of them: the largest up-block index is the answer, and the down blocks must agree. Targets
    that pick blocks (a regex, paths with block indices) or disagreeing names -> None (ambiguous)."""
    targets = adapter.configs["unet"]["target_modules"]
    picks_blocks = isinstance(targets, str) or any(
        part.endswith("blocks") or part in ("attentions", "mid_block") for t in targets for part in t.split("."))
    found = {"up_blocks": set(), "down_blocks": set()}
    for key in adapter.state_dicts["unet"]:
        if (m := _UNET_ATTENTION.match(key)) is not None:
            found[m[1]].add(int(m[3]))
    up, down = found["up_blocks"], found["down_blocks"]
    if picks_blocks or not up or max(up) < 1 or up != set(range(max(up) + 1)):
        return None
    if down and down != set(range(max(up))):
        return None
    return max(up)


def _base_unet_config(base: str):
    from .bases.load import base_config
    from .errors import GraloraConfigError

    try:
        return base_config(base, "unet")
    except GraloraConfigError as err:
        raise ExportError(f"{err} Pass --layers-per-block N.") from None


def _unet_layers(config) -> int:
    value = config.get("layers_per_block") if isinstance(config, dict) else config.layers_per_block
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ExportError(f"The base UNet has per-level layers_per_block={value}; SDXL's kohya layout needs one number.")
    return value
