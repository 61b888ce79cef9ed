"""Generate samples with GraLoRA (or LoRA) adapters: a thin shell over `gralora_diffusion.generate`.

    python scripts/generate_samples.py --base stabilityai/stable-diffusion-xl-base-1.0 \
        --adapter output/pytorch_gralora_weights.safetensors --prompt "a photo of sks teapot" \
        --seeds 0,1 --scales 0,0.5,1.0 --output_dir generated

Same flags and errors as `gralora-diffusion generate` (`--help` lists them).
"""

import sys

from gralora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
