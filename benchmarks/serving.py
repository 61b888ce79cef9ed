"""`serving` benchmark: many GraLoRA adapters on one pipeline (the tiny world SDXL, or tiny random
SDXL with --quick), three measurements in one run:

(a) switching adapters: a hot-swap (`load_gralora_weights(..., hotswap=True)`) against unloading
    and loading the adapter again; and, with the models compiled, a request (switch + generate)
    served by hot-swap against one served by unload + load (which recompiles until dynamo's dynamic
    shapes settle);
(b) a batch of B images with B different adapters in one call (`gralora_adapter_names`) against the
    same batch with one adapter, and against B calls of one image each with its own adapter;
(c) the recompilations (dynamo's counters) over 20 hot-swaps of a compiled pipeline.

    python scripts/benchmark.py serving [--reps 5] [--threads 1 --clock cpu] [--compile_backend eager] [--json out.json] [--quick]

The default compile backend is "eager" on a CPU (dynamo's capture and guards only: what decides
whether a swap recompiles) and "inductor" on CUDA.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from gralora_diffusion.inject import add_gralora
from gralora_diffusion.loader import patch_pipeline
from gralora_diffusion.tiny import tiny_sdxl_pipeline
from .common import machine, paired_ratio, summarize, table, time_interleaved

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PROMPTS = ["a red ball on grass", "a blue cube in a room", "a green cone on sand", "a yellow star in the sky"]


def base_pipeline(quick: bool, device):
    from gralora_diffusion.world.model import tiny_world_pipeline

    pipe = patch_pipeline(tiny_sdxl_pipeline(seed=0) if quick else tiny_world_pipeline()).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter_files(folder: Path, quick: bool, ranks) -> list[Path]:
    """One adapter per rank (k=2, UNet and both text encoders' attention), B random so each differs."""
    files = []
    for i, r in enumerate(ranks):
        pipe = base_pipeline(quick, "cpu")
        add_gralora(pipe, r=r, gralora_k=2, text_encoder_targets="attn", adapter_name="a")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for c in COMPONENTS:
                for name, p in getattr(pipe, c).named_parameters():
                    if "gralora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        files.append(pipe.save_gralora_weights(folder / f"adapter{i}", adapter_name="a"))
    return files


def run(args) -> dict:
    from torch._dynamo.utils import counters

    device = torch.device(args.device)
    quick = bool(args.quick)
    reps, steps, size = (2, 1, 64) if quick else (args.reps, 4, 64)
    backend = getattr(args, "compile_backend", None) or ("inductor" if device.type == "cuda" else "eager")
    ranks = (4, 8, 16, 8)  # four adapters of three ranks, same k
    batch = len(PROMPTS)

    def call(pipe, prompts, **kwargs):
        return pipe(prompts, num_inference_steps=steps, height=size, width=size, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    with tempfile.TemporaryDirectory() as tmp:
        files = adapter_files(Path(tmp), quick, ranks)
        names = [f"a{i}" for i in range(batch)]

        # (b) per-image adapters
        pipe = base_pipeline(quick, device)
        for name, path in zip(names, files):
            pipe.load_gralora_weights(path, adapter_name=name)

        def one_adapter():
            pipe.set_gralora_adapters([names[0]])
            call(pipe, PROMPTS)

        def separate_calls():
            for name, prompt in zip(names, PROMPTS):
                pipe.set_gralora_adapters([name])
                call(pipe, [prompt])

        batch_cases = {f"{batch} adapters, one call": lambda: call(pipe, PROMPTS, gralora_adapter_names=names),
                       "1 adapter, one call": one_adapter, f"{batch} calls, one adapter each": separate_calls}
        batch_stats = {n: summarize(s) for n, s in
                       time_interleaved(batch_cases, reps, 1, device, clock=args.clock).items()}
        del pipe

        # (a) switching: hot-swap vs unload + load, eager
        swap_pipe, reload_pipe = base_pipeline(quick, device), base_pipeline(quick, device)
        swap_pipe.enable_gralora_hotswap(target_rank=max(ranks))
        swap_pipe.load_gralora_weights(files[0], adapter_name="x")
        reload_pipe.load_gralora_weights(files[0], adapter_name="x")
        turn = {"swap": 0, "reload": 0}

        def hotswap(pipe=swap_pipe):
            turn["swap"] += 1
            pipe.load_gralora_weights(files[turn["swap"] % len(files)], adapter_name="x", hotswap=True)

        def reload(pipe=reload_pipe):
            turn["reload"] += 1
            pipe.delete_gralora_adapters(["x"])
            pipe.load_gralora_weights(files[turn["reload"] % len(files)], adapter_name="x")

        switch_stats = {n: summarize(s) for n, s in time_interleaved(
            {"hot-swap": hotswap, "unload + load": reload}, 3 * reps, 1, device, clock=args.clock).items()}

        # (a) and (c) compiled: a request = switch + one image; recompilations counted (every reload recompiles:
        # dynamo's limit raised so none falls back to eager unnoticed)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for pipe in (swap_pipe, reload_pipe):
            for c in COMPONENTS:
                getattr(pipe, c).compile(backend=backend)
        torch._dynamo.reset()
        start = time.perf_counter()
        call(swap_pipe, PROMPTS[:1])
        compile_s = time.perf_counter() - start
        counters.clear()
        for _ in range(20):
            hotswap()
            call(swap_pipe, PROMPTS[:1])
        swap_graphs = counters["stats"]["unique_graphs"]
        call(reload_pipe, PROMPTS[:1])  # its first compile
        counters.clear()
        request_samples = time_interleaved(
            {"hot-swap + generate (compiled)": lambda: (hotswap(), call(swap_pipe, PROMPTS[:1])),
             "unload + load + generate (compiled)": lambda: (reload(), call(reload_pipe, PROMPTS[:1]))},
            reps, 0, device, clock=args.clock)
        request_stats = {n: summarize(s) for n, s in request_samples.items()}
        reload_graphs = counters["stats"]["unique_graphs"]  # over `reps` unload + load (+ the swaps interleaved: 0)

    mixed, single, separate = (batch_stats[n] for n in batch_cases)
    ratios = {"mixed_vs_one_adapter": paired_ratio(mixed, single), "mixed_vs_separate_calls": paired_ratio(mixed, separate),
              "hotswap_vs_unload_load": paired_ratio(switch_stats["hot-swap"], switch_stats["unload + load"]),
              "compiled_request_hotswap_vs_reload": paired_ratio(*request_stats.values())}
    rows = [[n, f"{s['median_ms']:.1f}", f"{100 * s['spread']:.0f}%"]
            for n, s in {**batch_stats, **switch_stats, **request_stats}.items()]
    print(table(["case", "ms", "spread"], rows))
    print(table(["ratio", "median", "spread"], [[n, f"{r['median']:.3f}×", f"{100 * r['spread']:.0f}%"] for n, r in ratios.items()]))
    print(f"recompilations: {swap_graphs} new graphs over 20 hot-swaps (+ an image after each); {reload_graphs} over {reps} "
          f"unload + load (+ an image after each). First compiled call {compile_s:.1f} s (backend {backend}).")
    print(f"{'tiny SDXL (--quick)' if quick else 'tiny world SDXL'}, {size}×{size}, {steps} steps, guidance on; adapters "
          f"r={ranks} k=2 on the UNet's and both text encoders' attention (hot-swap target rank {max(ranks)}); "
          f"medians of {reps} interleaved rounds (switching: {3 * reps}).")
    return {"benchmark": "serving", "device": str(device), "quick": quick, "reps": reps, "steps": steps, "size": size,
            "ranks": list(ranks), "compile_backend": backend, "compile_s": compile_s, "machine": machine(device),
            "results": {**batch_stats, **switch_stats, **request_stats}, "ratios": ratios,
            "recompiles_over_20_hotswaps": swap_graphs, f"recompiles_over_{reps}_reloads": reload_graphs}
