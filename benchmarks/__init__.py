"""Benchmarks, outside the installed package (developer tools, not library code): one module each
with `run(args) -> dict` (prints its table, returns the JSON record), run through `scripts/benchmark.py NAME`: `layer` (one adapted SDXL Linear: frozen, PEFT LoRA, PEFT
GraLoRA, ours), `infer` (a pipeline call with the adapter unfused, fused, and without it), and
whatever other module sits here (the trainer's `step`, the loader's `load`, `serving`: hot-swap and
per-image adapters). `common` holds the
timing harness they share."""

import pkgutil

BENCHMARKS = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common"))
