#!/usr/bin/env python
"""Pretrain the tiny world model on a CPU, one stage at a time (each resumable, one torch thread):

    python scripts/pretrain_world.py vae       RUN_DIR   # 800 steps of a 1600-step schedule
    python scripts/pretrain_world.py evaluator RUN_DIR   # beside `vae`
    python scripts/pretrain_world.py unet      RUN_DIR   # caches latents from the stage-1 encoder first
    python scripts/pretrain_world.py decoder   RUN_DIR   # beside `unet`: the encoder (so the latents) stays put
    python scripts/pretrain_world.py export    RUN_DIR   # fp16 safetensors into the package
    python scripts/pretrain_world.py measure   RUN_DIR   # the README's numbers for the shipped weights

Defaults are the shipped weights' settings (world/stages.py); --steps sets another schedule length.
The logic is in gralora_diffusion/world/ (pretrain.py, pretrain_unet.py, evaluator.py, weights.py)."""

import argparse
from pathlib import Path

import torch

from gralora_diffusion.flags import FlagParser


def main():
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "decoder", "unet", "evaluator", "export", "measure"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = {k: v for k, v in (("steps", args.steps), ("batch", args.batch)) if v is not None}
    from gralora_diffusion.world import stages

    stages.run(args.stage, args.run_dir, **extra)


if __name__ == "__main__":
    main()
