"""Timing harness shared by the benchmarks: interleaved repetitions, medians and their spread,
bytes saved for backward, and the machine the numbers come from."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gralora_diffusion.constants import torch_dtype

# The dtypes a benchmark takes (--dtype), resolved by the package's one dtype table.
DTYPES = {name: torch_dtype(name) for name in ("fp32", "bf16", "fp16")}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: `benchmarks` imports from here


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(cases: dict[str, Callable[[], None]], reps: int, warmup: int, device: torch.device,
                     before: Callable[[], None] | None = None, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call of every case. Each repetition runs every case once, in an order rotated
    by one per repetition, so a slow phase of the machine falls on all cases alike. `before` runs
    untimed ahead of each call (e.g. to drop gradients). clock "cpu" counts this process's CPU
    time: on a CPU shared with other work and one torch thread, it leaves out the time the
    process waited for a core (wall time would count it)."""
    if clock == "cpu" and device.type != "cpu":
        raise ValueError(f"clock 'cpu' measures CPU work only; use clock 'wall' on {device}.")
    now = CLOCKS[clock]
    names = list(cases)
    samples = {name: [] for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            if before is not None:
                before()
            synchronize(device)
            start = now()
            cases[name]()
            synchronize(device)
            if rep >= warmup:
                samples[name].append(now() - start)
    return samples


def spread(values: list[float]) -> float:
    """Interquartile range over the median (max - min over the median below 4 values)."""
    median = statistics.median(values)
    q1, q3 = statistics.quantiles(values, n=4)[::2] if len(values) >= 4 else (min(values), max(values))
    return (q3 - q1) / median if median else 0.0


def summarize(seconds: list[float]) -> dict:
    """Median in ms, its spread, and the samples in ms (in repetition order, for paired ratios)."""
    return {"median_ms": statistics.median(seconds) * 1e3, "spread": spread(seconds), "n": len(seconds),
            "samples_ms": [s * 1e3 for s in seconds]}


def paired_ratio(a: dict, b: dict) -> dict:
    """Median over repetitions of a/b, each pair timed in the same interleaved round: a slow
    phase of a shared machine moves both sides and drops out of the ratio."""
    ratios = [x / y for x, y in zip(a["samples_ms"], b["samples_ms"])]
    return {"median": statistics.median(ratios), "spread": spread(ratios)}


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `fn()` runs, leaving out
    the storages of `exclude` (the parameters, which exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "cpus": os.cpu_count(),
            "cpu": cpu_model(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table, so the printed output pastes into the README as it is."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c}" for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def run_child(argv: list[str], spec: dict, cpu_only: bool = True) -> dict:
    """Run `python -m <argv> <spec as JSON>` in a fresh process (a fresh peak RSS) and return the
    JSON it prints on its last line."""
    import json
    import subprocess
    import sys

    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": path}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", *argv, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {argv} {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
