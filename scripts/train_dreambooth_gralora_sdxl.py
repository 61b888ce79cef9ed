#!/usr/bin/env python
"""DreamBooth GraLoRA training for SDXL, for `accelerate launch`:

    accelerate launch scripts/train_dreambooth_gralora_sdxl.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --instance_data_dir photos --instance_prompt "a photo of sks teapot" --output_dir out

Same flags as `gralora-diffusion train` (`--help` lists them); the work is in gralora_diffusion.train.
"""

import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet optional-backend notices at import

from gralora_diffusion import threads
from gralora_diffusion.failures import expected_errors, one_line
from gralora_diffusion.train import TrainConfig, train
from gralora_diffusion.train.config import add_arguments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    threads.add_argument(parser)
    args = parser.parse_args(argv)
    try:
        threads.set_num_threads(args.num_threads)  # said when the model starts to load, as in the CLI
        train(TrainConfig.from_args(args), command=f"accelerate launch {sys.argv[0]}")
    except KeyboardInterrupt:  # train() has said where the last checkpoint is and how to resume
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's error edge (failures.py): one line and exit 2, or re-raised
        if not isinstance(err, expected_errors()):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
