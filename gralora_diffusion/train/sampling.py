"""Sample images during and after training: every validation prompt x N seeds, saved one by one
and as a grid (rows = prompts, columns = seeds) with diffusers' `make_image_grid`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers.utils import make_image_grid


def latent_stats(vae_config, like: torch.Tensor):
    """(latents_mean, latents_std) as tensors shaped like `like`'s channels, or None when the VAE has none."""
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is None or std is None:
        return None
    return tuple(torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1) for v in (mean, std))


def generate_images(pipeline, prompts: list[str], generators: list, resolution: int, steps: int, autocast=contextlib.nullcontext) -> list:
    """PIL images. Denoising runs under `autocast` (mixed precision); the VAE decodes outside it in
    its own dtype, because SDXL's VAE overflows in fp16 (the pipeline would only upcast an fp16 VAE).
    The global RNG is left as it was, so sampling mid-run does not change the rest of the run."""
    vae = pipeline.vae
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        with autocast():
            latents = pipeline(prompts, num_inference_steps=steps, height=resolution, width=resolution,
                               generator=generators, output_type="latent").images
        latents = latents.to(vae.dtype)
        stats = latent_stats(vae.config, latents)
        latents = latents / vae.config.scaling_factor if stats is None else latents * stats[1] / vae.config.scaling_factor + stats[0]
        return pipeline.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")


def generate_samples(pipeline, prompts: list[str], num_images: int, resolution: int, steps: int, seed: int, autocast=contextlib.nullcontext) -> list[list]:
    """[prompt][i] PIL images; image i of every prompt uses seed + i."""
    return [
        generate_images(pipeline, [prompt] * num_images, [torch.Generator().manual_seed(seed + i) for i in range(num_images)],
                        resolution, steps, autocast)
        for prompt in prompts
    ]


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


def sample_scorers(cfg, device) -> list:
    """--validation_metrics: DreamBooth's scorers (and the base's own) bound to the instance images."""
    from ..evaluate import instance_scorers

    dino, clip = cfg.metric_models
    return instance_scorers(cfg.instance_data_dir, cfg.instance_prompt, dino, clip, device, cfg.pretrained_model_name_or_path)


def sample_metrics(scorers: list, rows: list[list], prompts: list[str]) -> dict[str, float]:
    """{"validation/dino": ..., ...} for the [prompt][i] sample images."""
    from ..evaluate import score_images

    return {f"validation/{name}": value for name, value in score_images(scorers, rows, prompts).items()}
