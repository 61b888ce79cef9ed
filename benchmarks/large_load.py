"""`large_load` benchmark: peak memory of `load_gralora_weights` for an adapter larger than 1 GiB.

A child process builds a base "UNet" of SDXL-width Linears, then loads a GraLoRA adapter file of
`--size_gib` into it; another child only reads the same file with `safetensors.torch.load_file`
(one copy of the tensors, the least any loader can hold). Reported: peak RSS growth over the base
model (`ru_maxrss`) as a multiple of the file size. About 1.0x means the tensors were streamed
into place once; 2.0x would mean they were held twice.

    python scripts/benchmark.py large_load [--size_gib 1.1] [--quick] [--json out.json]
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

WIDTH, MODULES, K = 4096, 8, 2


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rank_for(size_gib: float, width: int) -> int:
    # per module: A [k, in/k, r] + B [k, r, out/k] = r·(in+out) fp32 numbers
    r = int(size_gib * 2**30 / (MODULES * 2 * width * 4))
    return max(K, r - r % K)


def _base_model(width: int):
    import torch.nn as nn

    blocks = nn.ModuleList()
    for _ in range(MODULES):
        block = nn.Module()
        block.to_q = nn.Linear(width, width, bias=False)
        blocks.append(block)
    model = nn.Module()
    model.blocks = blocks
    return model.requires_grad_(False)


def write_adapter(path: Path, size_gib: float, width: int) -> int:
    import torch

    from gralora_diffusion.adapter_file import save_adapter_file

    r = _rank_for(size_gib, width)
    g = torch.Generator().manual_seed(0)
    state_dict = {}
    for i in range(MODULES):
        state_dict[f"blocks.{i}.to_q.gralora_A"] = torch.randn(K, width // K, r, generator=g) * 0.01
        state_dict[f"blocks.{i}.to_q.gralora_B"] = torch.randn(K, r, width // K, generator=g) * 0.01
    config = {"r": r, "alpha": 2 * r, "gralora_k": K, "hybrid_r": 0, "target_modules": ["to_q"]}
    save_adapter_file(path, {"unet": state_dict}, {"unet": config})
    return r


def child(spec: dict) -> dict:
    """Runs in a fresh process: measure one way of reading the file."""
    import torch

    torch.set_num_threads(1)
    path = Path(spec["path"])
    if spec["mode"] == "load_gralora_weights":
        from gralora_diffusion.loader import patch_pipeline

        class Holder:  # any object with a `unet` module is a pipeline to the loader
            pass

        pipe = Holder()
        pipe.unet = _base_model(spec["width"])
        pipe = patch_pipeline(pipe)
        before, start = _rss_mib(), time.perf_counter()
        pipe.load_gralora_weights(path, adapter_name="big")
    else:
        from safetensors.torch import load_file

        before, start = _rss_mib(), time.perf_counter()
        tensors = load_file(str(path))  # noqa: F841 - held until the peak is read
    seconds = time.perf_counter() - start
    return {"rss_before_mib": before, "peak_mib": _peak_mib(), "rss_after_mib": _rss_mib(), "seconds": seconds}


def run(args) -> dict:
    from .common import run_child, table

    quick = bool(getattr(args, "quick", False))
    size_gib = 0.05 if quick else float(getattr(args, "size_gib", None) or 1.1)
    width = 512 if quick else WIDTH
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.safetensors"
        r = write_adapter(path, size_gib, width)
        file_mib = path.stat().st_size / 2**20
        results = {mode: run_child(["benchmarks.large_load"], {"mode": mode, "path": str(path), "width": width})
                   for mode in ("safetensors load_file", "load_gralora_weights")}
    rows = []
    for mode, res in results.items():
        res["peak_growth_x_file"] = (res["peak_mib"] - res["rss_before_mib"]) / file_mib
        rows.append([mode, f"{res['seconds']:.1f}", f"{res['rss_before_mib']:.0f}", f"{res['peak_mib']:.0f}",
                     f"{res['peak_growth_x_file']:.2f}×"])
    print(f"adapter file: {file_mib:.0f} MiB ({MODULES} Linear {width}->{width}, GraLoRA r={r}, k={K}, fp32)")
    print(table(["reader", "seconds", "RSS before MiB", "peak RSS MiB", "peak growth / file size"], rows))
    return {"benchmark": "large_load", "file_mib": file_mib, "r": r, "width": width, "results": results}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
