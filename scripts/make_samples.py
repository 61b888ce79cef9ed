#!/usr/bin/env python
"""Draw samples/: five 128x128 pictures of one red teapot in different places, sizes and
backgrounds (`gralora_diffusion.world.subject`). Run once; the PNGs are committed.
`python scripts/make_samples.py [folder]`."""

import sys

from gralora_diffusion.world.subject import draw_samples


def main(folder="samples"):
    print(f"wrote {len(draw_samples(folder))} images to {folder}/")


if __name__ == "__main__":
    main(*sys.argv[1:])
