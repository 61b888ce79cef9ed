"""Sample images during and after training: every validation prompt x N seeds, saved one by one
and as a grid (rows = prompts, columns = seeds) with diffusers' `make_image_grid`."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import make_image_grid


def generate_samples(pipeline, prompts: list[str], num_images: int, resolution: int, steps: int, seed: int) -> list[list]:
    """[prompt][i] PIL images; image i of every prompt uses seed + i. The global RNG is left as it
    was, so sampling in the middle of a run does not change the rest of the run."""
    rows = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for prompt in prompts:
            generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)]
            rows.append(
                pipeline(
                    [prompt] * num_images, num_inference_steps=steps, height=resolution, width=resolution, generator=generators
                ).images
            )
    return rows


def save_samples(rows: list[list], folder: Path, tag: str) -> tuple[Path, list[Path]]:
    """Write `{tag}-p{prompt}-{i}.png` for each image and `{tag}-grid.png`; return (grid, images)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, row in enumerate(rows):
        for i, image in enumerate(row):
            paths.append(folder / f"{tag}-p{p}-{i}.png")
            image.save(paths[-1])
    grid = make_image_grid([im for row in rows for im in row], rows=len(rows), cols=len(rows[0]))
    grid_path = folder / f"{tag}-grid.png"
    grid.save(grid_path)
    return grid_path, paths
