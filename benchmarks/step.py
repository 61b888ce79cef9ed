"""`step` benchmark: one update of the DreamBooth trainer (`gralora_diffusion.train`) on the tiny SDXL,
time per step and peak memory, for GraLoRA vs `--adapter lora` at the same rank, caching on vs off,
gradient checkpointing on vs off; with `--torch_compile`, GraLoRA and LoRA compiled vs not (steady-state
step, and the first step's extra time: the compile).

Step times come from one process that runs every variant for a few steps, round after round in
rotated order (a slow phase of a shared machine falls on all alike); peak RSS (`ru_maxrss`, which
only ever grows within a process) from one fresh process per variant.

    python scripts/benchmark.py step [--quick] [--threads 1 --clock cpu] [--device cuda] [--json out.json]
                                     [--mixed_precision no|bf16|fp16] [--torch_compile]
    python -m benchmarks.step [same options]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from gralora_diffusion.flags import FlagParser

BASE = {"adapter": "gralora", "cache_latents": False, "cache_text_embeddings": False, "gradient_checkpointing": False}
VARIANTS = {
    "gralora": {},
    "lora (same rank)": {"adapter": "lora"},
    "gralora + caching": {"cache_latents": True, "cache_text_embeddings": True},
    "gralora + grad checkpointing": {"gradient_checkpointing": True},
    "gralora + fused backward": {"fused_backward_pass": True},
}
COMPILED = {"gralora": {}, "lora (same rank)": {"adapter": "lora"}, "gralora compiled": {"torch_compile": True},
            "lora compiled": {"adapter": "lora", "torch_compile": True}}
COMPARISONS = [("gralora", "lora (same rank)"), ("gralora", "gralora + caching"), ("gralora + grad checkpointing", "gralora"),
               ("gralora + fused backward", "gralora"),
               ("gralora compiled", "gralora"), ("lora compiled", "lora (same rank)"), ("gralora compiled", "lora compiled")]
PRECISION = {"fp32": "no", "no": "no", "bf16": "bf16", "fp16": "fp16"}
WARMUP = 3


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _config(spec: dict, variant: str, data: Path, out: Path, steps: int):
    from gralora_diffusion.tiny import TINY_MODEL_ID
    from gralora_diffusion.train import TrainConfig

    return TrainConfig(
        pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(data), instance_prompt="a photo of sks teapot",
        output_dir=str(out), resolution=spec["resolution"], train_batch_size=spec["batch"], rank=8, max_train_steps=steps,
        checkpointing_steps=10**9, seed=0, report_to="none", mixed_precision=PRECISION[spec["dtype"]], repeats=100,
        **{**BASE, **{**VARIANTS, **COMPILED}[variant]},
    )


def _images(folder: Path, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def child(spec: dict) -> dict:
    """mode "time": every variant in this process, short runs in rotated order, round after round,
    so a slow phase of the machine falls on all alike; returns {variant: step seconds}, and
    {variant: first-step seconds per round} under "first" (the compile, for compiled variants).
    A variant that fails is reported under "failed" and left out of later rounds.
    mode "memory": one variant in a fresh process; returns its RSS at the start and at the peak (MiB)."""
    import torch

    from gralora_diffusion.tiny import tiny_sdxl_pipeline
    from gralora_diffusion.train import train

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    clock = time.process_time if spec["clock"] == "cpu" else time.perf_counter
    names = list(COMPILED if spec.get("compile") else VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        data = _images(Path(tmp) / "data", spec["resolution"])
        if spec["mode"] == "memory":
            pipe, start = tiny_sdxl_pipeline(seed=0), _rss_mb()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            train(_config(spec, spec["variant"], data, Path(tmp) / "out", WARMUP + 2), pipeline=pipe)
            result = {"start_rss_mb": start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            if torch.cuda.is_available():
                result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            return result
        times, first, failed = {name: [] for name in names}, {name: [] for name in names}, {}
        for r in range(spec["rounds"]):
            for name in names[r % len(names):] + names[: r % len(names)]:
                if name in failed:
                    continue
                cfg = _config(spec, name, data, Path(tmp) / f"out{r}{names.index(name)}", WARMUP + spec["steps"])
                pipe = tiny_sdxl_pipeline(seed=0)
                marks = [clock()]
                try:
                    train(cfg, pipeline=pipe, on_step=lambda step, loss: marks.append(clock()))
                except Exception as err:  # noqa: BLE001 - a benchmark reports what broke and goes on
                    failed[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                    continue
                steps = [b - a for a, b in zip(marks, marks[1:])]
                times[name] += steps[WARMUP:]
                first[name].append(steps[0])
        return {**times, "first": first, "failed": failed}


def run(args) -> dict:
    from .common import machine, paired_ratio, run_child, summarize, table

    import torch

    quick = bool(getattr(args, "quick", False))
    compiled = bool(getattr(args, "torch_compile", False))
    spec = {"threads": getattr(args, "threads", None), "clock": getattr(args, "clock", "wall"),
            "dtype": getattr(args, "mixed_precision", None) or getattr(args, "dtype", "fp32"), "compile": compiled,
            "steps": 3 if quick else 5, "rounds": 2 if quick else max(2, getattr(args, "reps", 10) or 10),
            "resolution": getattr(args, "resolution", None) or (64 if quick else 128),
            "batch": getattr(args, "batch", None) or (1 if quick else 2)}
    cpu_only = str(getattr(args, "device", "cpu")).startswith("cpu")

    def _spawn(child_spec):
        return run_child(["benchmarks.step", "--child"], child_spec, cpu_only)

    times = _spawn({**spec, "mode": "time"})
    first, failed = times.pop("first"), times.pop("failed")
    stats = {}
    for name, samples in times.items():
        if name in failed:
            continue
        stats[name] = {**summarize(samples), "first_step_ms": [1e3 * t for t in first[name]]}
        if not compiled:  # a fresh process per compiled variant would compile again: memory only uncompiled
            stats[name] |= _spawn({**spec, "mode": "memory", "variant": name})
    print(_table(stats, compiled, table))
    ratios = {f"{a} / {b}": paired_ratio(stats[a], stats[b]) for a, b in COMPARISONS if a in stats and b in stats}
    print("; ".join(f"{k}: {v['median']:.2f}× ±{100 * v['spread'] / 2:.0f}%" for k, v in ratios.items()))
    for name, reason in failed.items():
        print(f"{name}: FAILED: {reason}")
    print(f"Tiny SDXL trainer, {spec['resolution']} px, batch {spec['batch']}, rank 8 (GraLoRA k=2) on UNet attention, "
          f"{spec['dtype']}, {spec['clock']} clock, threads {spec['threads'] or torch.get_num_threads()}; time: median over "
          f"{spec['rounds']} rotated rounds x {spec['steps']} steps (after {WARMUP} warm-up steps) in one process; ratios: "
          "median of the per-step ratios paired within a round (± half their IQR)"
          + ("." if compiled else "; memory: each variant in its own process."))
    return {"benchmark": "step", "device": str(getattr(args, "device", "cpu")), "spec": spec,
            "machine": machine(torch.device("cpu")), "results": stats, "ratios": ratios, "failed": failed}


def _table(stats: dict, compiled: bool, table) -> str:
    """ms/step vs GraLoRA; memory columns for uncompiled runs, the first step (setup + compile) for compiled ones."""
    import statistics

    base = stats.get("gralora", next(iter(stats.values())))["median_ms"]
    header = ["variant", "ms / step", "vs gralora", "spread"]
    header += ["first step ms (median over rounds)"] if compiled else ["peak RSS MiB", "peak - start MiB"]
    rows = []
    for name, s in stats.items():
        row = [name, f"{s['median_ms']:.1f}", f"{s['median_ms'] / base:.2f}×", f"{100 * s['spread']:.0f}%"]
        if compiled:
            row.append(f"{statistics.median(s['first_step_ms']):.0f} (round 1: {s['first_step_ms'][0]:.0f})")
        else:
            row += [f"{s['peak_rss_mb']:.0f}", f"{s['peak_rss_mb'] - s['start_rss_mb']:.0f}"]
        rows.append(row)
    if any("cuda_peak_mb" in s for s in stats.values()):
        header.append("CUDA peak MiB")
        for row, s in zip(rows, stats.values()):
            row.append(f"{s.get('cuda_peak_mb', 0):.0f}")
    return table(header, rows)


def main(argv=None) -> dict:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(PRECISION))
    parser.add_argument("--mixed_precision", choices=sorted(PRECISION), help="the trainer's --mixed_precision (same as --dtype)")
    parser.add_argument("--torch_compile", action="store_true", help="GraLoRA and LoRA, compiled vs not")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--reps", type=int, default=10, help="rounds (each variant runs 5 timed steps per round)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (busy shared CPU, with --threads 1)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
