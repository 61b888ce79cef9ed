"""A plain LoRA file in diffusers' layout (the trainer's `--adapter lora` baseline, or our own
diffusers export) read as an `AdapterFile`, so `export_lora` re-keys it to kohya or diffusers names,
or SVD-truncates it, the way it exports a GraLoRA adapter.

Each component's config is `{"kind": "lora", "r", "alpha", "rank_pattern", "alpha_pattern",
"target_modules"}` from the file's `lora_adapter_metadata` header (diffusers' `save_lora_weights`
writes PEFT's LoraConfig there); a file without one has alpha = rank, as diffusers' loader assumes.
Per module the state dict holds `lora_A.weight` [r, in] and `lora_B.weight` [out, r].
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .adapter_file import AdapterFile
from .errors import ExportError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# diffusers' own names for the two factors (PEFT's, diffusers' old attention processors', and what
# convert_state_dict_to_diffusers writes)
_KEY = re.compile(r"^(?P<component>[a-z_0-9]+)\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|"
                  r"lora_linear_layer\.down|lora_linear_layer\.up)\.weight$")
_DOWN = ("lora_A", "lora.down", "lora_linear_layer.down")


def is_lora_config(config: dict) -> bool:
    return config.get("kind") == "lora"


def _pattern_value(module: str, pattern: dict, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module path that ends with it."""
    for key, value in (pattern or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def module_scale(config: dict, module: str) -> float:
    r = _pattern_value(module, config.get("rank_pattern"), config["r"])
    return float(_pattern_value(module, config.get("alpha_pattern"), config["alpha"])) / r


def read_lora_source(path) -> AdapterFile:
    """The LoRA file at `path` as an AdapterFile (see the module's docstring). Kohya-keyed files and
    DoRA files are refused: a DoRA update depends on the base weight, so it is no plain LoRA."""
    from safetensors import safe_open

    from .info import _target

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if any(key.startswith(("lora_unet_", "lora_te")) for key in tensors):
        raise ExportError(f"{path}: kohya keys already; export-lora re-keys LoRA files in diffusers' layout "
                          "(the trainer's pytorch_lora_weights.safetensors). Use the file as it is.")
    if any("magnitude" in key for key in tensors):
        raise ExportError(f"{path}: a DoRA adapter (lora_magnitude_vector): its update rescales the base weight, so it "
                          "is not a plain LoRA and cannot be exported as one. Load it with diffusers' load_lora_weights.")
    try:
        header = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        header = {}
    state_dicts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None or match["component"] not in COMPONENTS:
            raise ExportError(f"{path}: {key!r} is not a LoRA tensor of unet/text_encoder/text_encoder_2 in diffusers' layout.")
        part = "lora_A.weight" if match["part"] in _DOWN else "lora_B.weight"
        state_dicts.setdefault(match["component"], {})[f"{match['module']}.{part}"] = tensor
    configs = {}
    for component, state_dict in state_dicts.items():
        ranks = sorted({t.shape[0] for k, t in state_dict.items() if k.endswith("lora_A.weight")})
        r = header.get(f"{component}.r", ranks[0])
        configs[component] = {
            "kind": "lora", "r": r, "alpha": header.get(f"{component}.lora_alpha", r),
            "rank_pattern": header.get(f"{component}.rank_pattern") or {},
            "alpha_pattern": header.get(f"{component}.alpha_pattern") or {},
            "target_modules": header.get(f"{component}.target_modules") or sorted({_target(m, False) for m in lora_modules(state_dict)}),
        }
    export = json.loads(metadata["gralora_export"]) if "gralora_export" in metadata else {}
    base = export.get("base_model") or metadata.get("base_model")
    return AdapterFile(state_dicts, configs, {"base_model": base} if base else {}, source=str(path), files=(str(path),))


def lora_modules(state_dict: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"lora_A.weight": down, "lora_B.weight": up}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, _, part = key.rpartition(".lora_")
        modules.setdefault(module, {})["lora_" + part] = tensor
    return dict(sorted(modules.items()))
