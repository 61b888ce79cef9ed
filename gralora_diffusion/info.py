"""What an adapter file holds, read from its header and tensors without building a model: a GraLoRA
adapter (`adapter_info`), or a plain LoRA file with diffusers or kohya keys (`lora_info`, from the
header's names, shapes and dtypes; only kohya's scalar `alpha` tensors are read)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from .adapter_config import scaling
from .constants import COMPONENTS
from .export import estimate_size, exact_rank, format_size, group_modules
from .sources import resolve_adapter

KOHYA_COMPONENTS = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder"}
LORA_DOWN = re.compile(r"\.(lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$")
LORA_PART = re.compile(r"\.(lora_[AB]|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer\.(down|up))\.weight$|\.alpha$")
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def known_targets() -> list[str]:
    """Every module name any family's presets list, longest first (to name a LoRA module's target)."""
    from .bases import families

    names = {t for f in families() for presets in f.module.PRESETS.values() for targets in presets.values() for t in targets}
    return sorted(names, key=len, reverse=True)


def adapter_info(path: str | os.PathLike) -> dict:
    """{kind: "gralora", file, file_size, format_version, base_model, dtype, params, components:
    {component: {r, k, hybrid_r, alpha, scaling, targets, modules, params, exact_lora_rank}},
    lora_export: {rank, size_bytes}}; for a plain LoRA file, `lora_info`'s dict (kind "lora").
    `path`: anything `load_gralora_weights` reads (file, folder, PEFT folder, Hub repo id), or a LoRA."""
    from .any_adapter import LORA, adapter_kind

    kind, target = adapter_kind(path)
    if kind == LORA:
        return lora_info(target)
    adapter = resolve_adapter(path)
    source = Path(adapter.source)
    components, dtypes = {}, set()
    for component, state_dict in adapter.state_dicts.items():
        config = adapter.configs[component]
        dtypes.update(str(t.dtype).removeprefix("torch.") for t in state_dict.values())
        components[component] = {
            "r": config["r"],
            "k": config["gralora_k"],
            "hybrid_r": config["hybrid_r"],
            "alpha": config["alpha"],
            "scaling": scaling(config),
            "targets": config["target_modules"],
            "modules": len(group_modules(state_dict)),
            "params": sum(t.numel() for t in state_dict.values()),
            "exact_lora_rank": exact_rank(config),
        }
    return {
        "kind": "gralora",
        "file": str(source),
        "file_size": source.stat().st_size if source.is_file() else sum(p.stat().st_size for p in source.rglob("*.safetensors")),
        "format_version": int(adapter.metadata.get("format_version", 0)),
        "base_model": adapter.base_model,
        "family": adapter.metadata.get("family"),  # None: written before families existed (an SDXL adapter)
        "dtype": ", ".join(sorted(dtypes)),
        "params": sum(c["params"] for c in components.values()),
        "components": components,
        "lora_export": {
            "rank": {c: v["exact_lora_rank"] for c, v in components.items()},
            "size_bytes": estimate_size(adapter),  # tensors only; the header adds a few kB
        },
    }


def _lora_key(key: str, kohya: bool) -> tuple[str, str]:
    """(component, module) of a LoRA tensor name."""
    module = LORA_PART.sub("", key)
    if kohya:
        prefix = next((p for p in KOHYA_COMPONENTS if module.startswith(p)), "")
        return KOHYA_COMPONENTS.get(prefix, "other"), module[len(prefix):]
    component, _, rest = module.partition(".")
    return (component, rest) if component in COMPONENTS else ("unet", module)


def _target(module: str, kohya: bool) -> str:
    """The module's short name (`to_q`, `to_out.0`, `fc1`), as a target list names it."""
    for name in known_targets():
        if module.endswith(("_" + name.replace(".", "_")) if kohya else ("." + name)) or module == name:
            return name
    return module.rsplit("_" if kohya else ".", 1)[-1]


def _header_json(metadata: dict, key: str) -> dict | None:
    """A JSON header field as a dict; None when missing or not a JSON object (info only reports it)."""
    try:
        value = json.loads(metadata.get(key) or "null")
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def lora_info(path: str | os.PathLike) -> dict:
    """{kind: "lora", format: "diffusers" | "kohya", file, file_size, base_model, dtype, params,
    components: {component: {modules, params, rank, alpha, targets}}, gralora_export} of a plain LoRA
    safetensors file. rank: "8", or "4-8" when modules differ; alpha: kohya's alpha tensors or the
    diffusers header's `lora_alpha`, None when the file has none (loaders then use alpha = rank)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
        alphas = {k: float(f.get_tensor(k)) for k, (shape, _) in tensors.items() if k.endswith(".alpha") and not shape}
    kohya = any(key.startswith("lora_") for key in tensors)
    header = _header_json(metadata, "lora_adapter_metadata") or {}
    components: dict[str, dict] = {}
    for key, (shape, _) in sorted(tensors.items()):
        component, module = _lora_key(key, kohya)
        entry = components.setdefault(component, {"modules": set(), "params": 0, "ranks": set(), "alpha": set(), "targets": set()})
        if key in alphas:
            entry["alpha"].add(alphas[key])
            continue
        entry["params"] += math.prod(shape)
        if LORA_DOWN.search(key):
            entry["modules"].add(module), entry["ranks"].add(shape[0]), entry["targets"].add(_target(module, kohya))
    components = dict(sorted(components.items(), key=lambda item: COMPONENTS.index(item[0]) if item[0] in COMPONENTS else 9))
    for component, entry in components.items():
        ranks, alpha = sorted(entry.pop("ranks")) or [0], sorted(entry.pop("alpha")) or [header.get(f"{component}.lora_alpha")]
        entry.update(modules=len(entry["modules"]), targets=sorted(entry["targets"]),
                     rank=str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}",
                     alpha=alpha[0] if len(alpha) == 1 else f"{alpha[0]:g}-{alpha[-1]:g}")
    export = _header_json(metadata, "gralora_export")
    return {
        "kind": "lora", "format": "kohya" if kohya else "diffusers", "file": str(path), "file_size": Path(path).stat().st_size,
        "base_model": (export or {}).get("base_model") or metadata.get("ss_base_model_version"),
        # the weights' dtype; kohya's scalar alpha tensors are fp32 whatever the weights are
        "dtype": ", ".join(sorted({SAFETENSORS_DTYPES.get(d, d) for k, (_, d) in tensors.items() if not k.endswith(".alpha")})),
        "params": sum(c["params"] for c in components.values()), "components": components, "gralora_export": export,
    }


def format_lora_info(info: dict) -> str:
    export = info["gralora_export"]
    lines = [
        f"file            {info['file']} ({format_size(info['file_size'])})",
        f"kind            plain LoRA, {info['format']} keys" + (" (exported from a GraLoRA adapter)" if export else ""),
        f"base model      {info['base_model'] or '(not recorded)'}",
        f"dtype           {info['dtype']}",
        f"parameters      {info['params']:,}",
        "",
        f"{'component':<16}{'modules':>8}{'params':>12}{'rank':>7}{'alpha':>8}  targets",
    ]
    for component, c in info["components"].items():
        alpha = "-" if c["alpha"] is None else f"{c['alpha']:g}" if isinstance(c["alpha"], float) else str(c["alpha"])
        lines.append(f"{component:<16}{c['modules']:>8}{c['params']:>12,}{c['rank']:>7}{alpha:>8}  {', '.join(c['targets'])}")
    return "\n".join(lines)


def format_info(info: dict) -> str:
    if info.get("kind") == "lora":
        return format_lora_info(info)
    lines = [
        f"file            {info['file']} ({format_size(info['file_size'])})",
        f"kind            GraLoRA adapter, format version {info['format_version']}",
        f"base model      {info['base_model'] or '(not recorded)'}",
        f"family          {info['family'] or 'sdxl (not recorded: written before families)'}",
        f"dtype           {info['dtype']}",
        f"parameters      {info['params']:,}",
        "",
        f"{'component':<16}{'modules':>8}{'params':>12}{'r':>5}{'k':>4}{'hybrid':>7}{'alpha':>7}{'LoRA rank':>10}  targets",
    ]
    for component, c in info["components"].items():
        targets = c["targets"] if isinstance(c["targets"], str) else ", ".join(c["targets"])
        lines.append(f"{component:<16}{c['modules']:>8}{c['params']:>12,}{c['r']:>5}{c['k']:>4}{c['hybrid_r']:>7}"
                     f"{c['alpha']:>7g}{c['exact_lora_rank']:>10}  {targets}")
    export = info["lora_export"]
    lines += ["", f"exact LoRA export: rank k·r + hybrid_r per component, about {format_size(export['size_bytes'])} "
                  f"in {info['dtype']} (gralora-diffusion export-lora)"]
    return "\n".join(lines)
