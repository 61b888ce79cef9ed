"""`infer` benchmark: a call of the tiny SDXL pipeline without adapter, with a GraLoRA adapter
unfused (our layer, and PEFT's layer class for comparison), and with it fused into the weights."""

from __future__ import annotations

import numpy as np
import torch
from peft.tuners.gralora.layer import Linear as PeftGraloraLinear

from gralora_diffusion.inject import add_gralora
from gralora_diffusion.layer import GraloraLinear
from gralora_diffusion.tiny import tiny_sdxl_pipeline
from .common import DTYPES, machine, summarize, table, time_interleaved

COMPONENTS = ["unet", "text_encoder", "text_encoder_2"]


def pipeline(device, dtype, adapter: str | None, r: int, k: int):
    """The tiny pipeline; `adapter`: None, "ours", "peft" (PEFT's layer class) or "fused"."""
    pipe = tiny_sdxl_pipeline(seed=0)
    if adapter is not None:
        with torch.random.fork_rng(devices=[]):  # the same A (random init) in every variant
            torch.manual_seed(0)
            add_gralora(pipe, r=r, gralora_k=k, unet_targets="attn+ff", text_encoder_targets="attn")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # B starts at zero; random values make the adapter act
            for c in COMPONENTS:
                for name, p in getattr(pipe, c).named_parameters():
                    if "gralora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for c in COMPONENTS:
            for module in getattr(pipe, c).modules():
                if adapter == "peft" and type(module) is GraloraLinear:
                    module.__class__ = PeftGraloraLinear
        if adapter == "fused":
            pipe.fuse_lora(components=COMPONENTS, lora_scale=1.0)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def run(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    size, steps, reps = (64, 2, 3) if args.quick else (128, 4, args.reps)
    r, k = 8, 2
    pipes = {"base": pipeline(device, dtype, None, r, k), "unfused (ours)": pipeline(device, dtype, "ours", r, k),
             "unfused (PEFT layer)": pipeline(device, dtype, "peft", r, k), "fused": pipeline(device, dtype, "fused", r, k)}

    def call(pipe):
        return pipe("a photo of sks teapot", num_inference_steps=steps, height=size, width=size, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    images = {name: call(pipe) for name, pipe in pipes.items()}
    samples = time_interleaved({name: (lambda p=pipe: call(p)) for name, pipe in pipes.items()}, reps, 1, device, clock=args.clock)
    stats = {name: summarize(s) for name, s in samples.items()}
    base_ms = stats["base"]["median_ms"]
    unfused = images["unfused (ours)"].astype(np.float64)
    print(table(["pipeline", "ms / call", "vs base", "spread", "max |image - unfused (ours)|"], [
        [name, f"{s['median_ms']:.1f}", f"{s['median_ms'] / base_ms:.2f}×", f"{100 * s['spread']:.0f}%",
         f"{np.abs(images[name] - unfused).max():.1e}"] for name, s in stats.items()]))
    print(f"Tiny SDXL pipeline, {size}×{size}, {steps} steps, GraLoRA r={r} k={k} on UNet attn+ff and both text "
          f"encoders' attention; median of {reps} interleaved calls.")
    return {"benchmark": "infer", "device": str(device), "dtype": args.dtype, "size": size, "steps": steps, "r": r,
            "k": k, "reps": reps, "quick": bool(args.quick), "machine": machine(device), "results": stats,
            "max_abs_diff_vs_unfused": {n: float(np.abs(im - unfused).max()) for n, im in images.items()}}
