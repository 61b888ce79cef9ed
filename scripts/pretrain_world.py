#!/usr/bin/env python
"""Pretrain the tiny world model on a CPU, one stage at a time (each resumable, one torch thread):

    python scripts/pretrain_world.py vae      RUN_DIR --steps 2400
    python scripts/pretrain_world.py evaluator RUN_DIR --steps 1500
    python scripts/pretrain_world.py decoder  RUN_DIR --steps 3000   # beside `unet`: the latents do not move
    python scripts/pretrain_world.py unet     RUN_DIR --steps 9000
    python scripts/pretrain_world.py export   RUN_DIR                # fp16 safetensors into the package

The logic is in gralora_diffusion/world/ (pretrain.py, pretrain_unet.py, evaluator.py, weights.py)."""

import argparse
from pathlib import Path

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "decoder", "unet", "evaluator", "export"])
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
