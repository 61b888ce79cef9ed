"""What an adapter file holds, read from its header and tensors without building a model."""

from __future__ import annotations

import os

from pathlib import Path

from .adapter_config import scaling
from .export import estimate_size, exact_rank, format_size, group_modules
from .sources import resolve_adapter


def adapter_info(path: str | os.PathLike) -> dict:
    """{file, file_size, format_version, base_model, dtype, params, components: {component: {r, k,
    hybrid_r, alpha, scaling, targets, modules, params, exact_lora_rank}}, lora_export: {rank, size_bytes}}.
    `path`: anything `load_gralora_weights` reads (file, folder, PEFT folder, Hub repo id)."""
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
        "file": str(source),
        "file_size": source.stat().st_size if source.is_file() else sum(p.stat().st_size for p in source.rglob("*.safetensors")),
        "format_version": int(adapter.metadata.get("format_version", 0)),
        "base_model": adapter.base_model,
        "dtype": ", ".join(sorted(dtypes)),
        "params": sum(c["params"] for c in components.values()),
        "components": components,
        "lora_export": {
            "rank": {c: v["exact_lora_rank"] for c, v in components.items()},
            "size_bytes": estimate_size(adapter),  # tensors only; the header adds a few kB
        },
    }


def format_info(info: dict) -> str:
    lines = [
        f"file            {info['file']} ({format_size(info['file_size'])})",
        f"format version  {info['format_version']}",
        f"base model      {info['base_model'] or '(not recorded)'}",
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
