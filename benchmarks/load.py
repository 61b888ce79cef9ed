"""`load` benchmark: `load_gralora_weights` against stock diffusers `load_lora_weights` of a LoRA
with the same number of parameters (GraLoRA r, k vs LoRA rank r on the same modules: r·(in+out)
each), on fresh tiny SDXL pipelines; and, for scale, the naive way (inject with random init, then
copy the weights in) that PEFT's `low_cpu_mem_usage` path lets the loader skip.

    python scripts/benchmark.py load [--reps 20] [--threads 1 --clock cpu] [--device cuda] [--json out.json] [--quick]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

from gralora_diffusion.adapter_file import read_adapter_file
from gralora_diffusion.inject import add_gralora
from gralora_diffusion.loader import patch_pipeline
from gralora_diffusion.tiny import tiny_sdxl_pipeline
from .common import machine, summarize, table, time_interleaved

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def adapter_files(folder: Path, r: int, k: int) -> tuple[Path, Path, int]:
    """(GraLoRA file, LoRA folder, parameters of each): both on the UNet's attention projections."""
    pipe = patch_pipeline(tiny_sdxl_pipeline(seed=0))
    add_gralora(pipe, r=r, gralora_k=k, unet_targets=TARGETS)
    gralora = pipe.save_gralora_weights(folder / "gralora")
    n_gralora = sum(p.numel() for n, p in pipe.unet.named_parameters() if "gralora_" in n)
    plain = tiny_sdxl_pipeline(seed=0)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False), plain.unet, "x")
    lora_sd = get_peft_model_state_dict(plain.unet, adapter_name="x")
    StableDiffusionXLPipeline.save_lora_weights(folder / "lora", unet_lora_layers=lora_sd)
    n_lora = sum(t.numel() for t in lora_sd.values())
    if n_lora != n_gralora:
        raise RuntimeError(f"parameter counts differ: LoRA {n_lora}, GraLoRA {n_gralora}")
    return gralora, folder / "lora", n_lora


def run(args) -> dict:
    r, k = 8, 2
    reps = 3 if args.quick else args.reps
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        gralora, lora, params = adapter_files(Path(tmp), r, k)
        adapter = read_adapter_file(gralora)
        fresh = {}

        def before():  # a new pipeline for every timed load, built untimed
            fresh["pipe"] = patch_pipeline(tiny_sdxl_pipeline(seed=0)).to(device)

        def naive():
            pipe = fresh["pipe"]
            add_gralora(pipe, r=r, gralora_k=k, unet_targets=TARGETS, adapter_name="x")  # random init first
            set_peft_model_state_dict(pipe.unet, adapter.state_dicts["unet"], adapter_name="x")

        cases = {
            "load_lora_weights (LoRA)": lambda: fresh["pipe"].load_lora_weights(lora),
            "load_gralora_weights (GraLoRA)": lambda: fresh["pipe"].load_gralora_weights(gralora),
            "naive: random init, then copy (no file, no checks)": naive,
        }
        samples = time_interleaved(cases, reps, 1, device, before=before, clock=args.clock)
    stats = {name: summarize(s) for name, s in samples.items()}
    lora_ms = stats["load_lora_weights (LoRA)"]["median_ms"]
    print(table(["load", "ms", "vs load_lora_weights", "spread"], [
        [name, f"{s['median_ms']:.1f}", f"{s['median_ms'] / lora_ms:.2f}×", f"{100 * s['spread']:.0f}%"]
        for name, s in stats.items()]))
    print(f"Tiny SDXL UNet attention ({', '.join(TARGETS)}): GraLoRA r={r} k={k} and LoRA r={r}, {params} parameters "
          f"each, from a local file into a fresh pipeline; median of {reps} interleaved loads.")
    return {"benchmark": "load", "device": str(device), "r": r, "k": k, "params": params, "reps": reps, "quick": bool(args.quick),
            "machine": machine(device), "results": stats,
            "ratio_gralora_vs_lora": stats["load_gralora_weights (GraLoRA)"]["median_ms"] / lora_ms}
