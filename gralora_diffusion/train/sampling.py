"""Sample images during and after training: every validation prompt x N seeds, saved one by one
and as a grid labelled with the prompts (rows) and seeds (columns), with `grids.labelled_grid`.
Each long step has its own progress bar, below the training bar (`step_bar`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..grids import labelled_grid, save_grid


def step_bar(total: int, desc: str, unit: str = "step", position: int = 1):
    """A bar for a long step inside training: at `position` 1 it sits under the training bar instead
    of overwriting it, and `leave=False` removes it when done, so the training bar carries on."""
    return tqdm(total=total, desc=desc, unit=unit, position=position, leave=False, dynamic_ncols=True)


def latent_stats(vae_config, like: torch.Tensor):
    """(latents_mean, latents_std) as tensors shaped like `like`'s channels, or None when the VAE has none."""
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is None or std is None:
        return None
    return tuple(torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1) for v in (mean, std))


def generate_images(pipeline, prompts: list[str], generators: list, resolution: int, steps: int, autocast=contextlib.nullcontext,
                    on_step=None) -> list:
    """PIL images. Denoising runs under `autocast` (mixed precision); the VAE decodes outside it in
    its own dtype, because SDXL's VAE overflows in fp16 (the pipeline would only upcast an fp16 VAE).
    The global RNG is left as it was, so sampling mid-run does not change the rest of the run.
    `on_step()` runs after each denoising step (the pipeline's `callback_on_step_end`)."""
    vae = pipeline.vae

    def callback(pipe, i, t, kwargs):
        on_step()  # tqdm's update returns True when it redrew: not what the pipeline wants back
        return kwargs

    from ..bases import family_of_pipeline
    from ..schedulers import check_steps

    check_steps(pipeline, steps)
    family = family_of_pipeline(pipeline)
    manual_decode = family is None or family.decode_outside_autocast
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        with autocast():
            images = pipeline(prompt=prompts, num_inference_steps=steps, height=resolution, width=resolution,
                              generator=generators, output_type="latent" if manual_decode else "pil",
                              callback_on_step_end=callback if on_step is not None else None).images
        if not manual_decode:  # the pipeline unpacks and decodes its own latents (packed DiT layouts)
            return images
        latents = images.to(vae.dtype)
        stats = latent_stats(vae.config, latents)
        latents = latents / vae.config.scaling_factor if stats is None else latents * stats[1] / vae.config.scaling_factor + stats[0]
        return pipeline.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")


def generate_samples(pipeline, prompts: list[str], num_images: int, resolution: int, steps: int, seed: int,
                     autocast=contextlib.nullcontext, desc: str = "samples", position: int = 1) -> list[list]:
    """[prompt][i] PIL images; image i of every prompt uses seed + i. A bar counts the denoising steps."""
    with step_bar(len(prompts) * steps, desc, position=position) as bar:
        return [
            generate_images(pipeline, [prompt] * num_images, [torch.Generator().manual_seed(seed + i) for i in range(num_images)],
                            resolution, steps, autocast, on_step=bar.update)
            for prompt in prompts
        ]


def save_samples(rows: list[list], folder: Path, tag: str, prompts: list[str] | None = None,
                 seeds: list[int] | None = None) -> tuple[Path, list[Path]]:
    """Write `{tag}-p{prompt}-{i}.png` for each image and `{tag}-grid.png`, its rows labelled with
    `prompts` and its columns with `seeds`; return (grid, images)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, row in enumerate(rows):
        for i, image in enumerate(row):
            paths.append(folder / f"{tag}-p{p}-{i}.png")
            image.save(paths[-1])
    prompts = prompts or [f"prompt {p}" for p in range(len(rows))]
    seeds = seeds if seeds is not None else list(range(len(rows[0])))
    grid = labelled_grid(rows, list(prompts), [f"seed {s}" for s in seeds])
    grid_path = folder / f"{tag}-grid.png"
    save_grid(grid, grid_path)
    return grid_path, paths


def sample_scorers(cfg, device) -> list:
    """--validation_metrics: DreamBooth's scorers (and the base's own) bound to the instance images."""
    from ..evaluate import instance_scorers
    from .hf_dataset import reference_images

    dino, clip = cfg.metric_models
    return instance_scorers(reference_images(cfg), cfg.instance_prompt, dino, clip, device, cfg.pretrained_model_name_or_path)


def sample_metrics(scorers: list, rows: list[list], prompts: list[str]) -> dict[str, float]:
    """{"validation/dino": ..., ...} for the [prompt][i] sample images."""
    from ..evaluate import score_images

    return {f"validation/{name}": value for name, value in score_images(scorers, rows, prompts).items()}
