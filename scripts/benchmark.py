"""Benchmarks of GraLoRA against PEFT's LoRA and GraLoRA: a thin shell over the top-level benchmarks/ folder.

    python scripts/benchmark.py layer [--device cpu|cuda] [--dtype fp32|bf16] [--autocast bf16|fp16] [--json out.json]
                                      [--quick|--full]
                                      [--configs paper|all] [--threads N] [--clock wall|cpu]
    python scripts/benchmark.py infer [--device cpu|cuda] [--dtype fp32|bf16] [--json out.json] [--quick]
    python scripts/benchmark.py serving [--reps 5] [--compile_backend eager|inductor] [--json out.json] [--quick]
    python scripts/benchmark.py NAME ...   (any other module of benchmarks/ with a run(args))

On a CPU shared with other work, `--threads 1 --clock cpu` gives the steadiest numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks/` sits beside scripts/, outside the package
from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks.common import DTYPES  # noqa: E402
from gralora_diffusion.flags import FlagParser  # noqa: E402  (snake_case flags with kebab-case aliases)


def parse(argv=None) -> argparse.Namespace:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--autocast", choices=["bf16", "fp16"],
                        help="layer: forward under torch.autocast in this dtype, frozen weights in it, adapters fp32")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny shapes, few repetitions)")
    parser.add_argument("--full", action="store_true", help="layer: every token count of the grid, not only the smaller one")
    parser.add_argument("--configs", default="paper", choices=["paper", "all"],
                        help="layer: (r, k) = (32, 2), (128, 4) as the paper pairs them, or all four of r in {32, 128}, k in {2, 4}")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per case (medians over these)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--size_gib", type=float, default=1.1, help="large_load: size of the adapter file to load")
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], help="step: the trainer's --mixed_precision (overrides --dtype)")
    parser.add_argument("--torch_compile", action="store_true", help="step: GraLoRA and LoRA steps compiled vs not, and the compile time")
    parser.add_argument("--compile_backend", help="serving: torch.compile backend (default: eager on CPU, inductor on CUDA)")
    parser.add_argument("--resolution", type=int, help="step: training resolution (default 128; --quick 64; the quickstart trains at 64)")
    parser.add_argument("--batch", type=int, help="step: train batch size (default 2; --quick 1; the quickstart trains at 2)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"],
                        help="memory: the step's optimizer, as train --optimizer (adamw8bit: bitsandbytes' 8-bit AdamW)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: this process's CPU time, for a CPU shared with other work (use with --threads 1)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here; use --device cpu.")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = importlib.import_module(f"benchmarks.{args.benchmark}").run(args)
    result["command"] = " ".join(["python scripts/benchmark.py"] + (sys.argv[1:] if argv is None else list(argv)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
