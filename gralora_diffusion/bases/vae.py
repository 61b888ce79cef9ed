"""Latent-space rules several families share: encoding pixels to the latent distribution's parameters
(what the trainer caches), SD/SDXL's scaling (with latents_mean/std when the VAE declares them), the
(x - shift_factor)·scaling_factor normalization of SD3 and FLUX.1, and the default image size of DiT
pipelines whose denoiser config has no sample_size."""

from __future__ import annotations


def vae_encode(pipe, pixels):
    return pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.parameters


def shift_and_scale(pipe, latents):
    config = pipe.vae.config
    return (latents - config.shift_factor) * config.scaling_factor


def scale(pipe, latents):
    """scaling_factor, and latents_mean/std when the VAE declares them (the pipeline undoes the same)."""
    from ..train.sampling import latent_stats

    config = pipe.vae.config
    stats = latent_stats(config, latents)
    if stats is None:
        return latents * config.scaling_factor
    return (latents - stats[0]) * config.scaling_factor / stats[1]


def default_resolution(pipe) -> int:
    """What a DiT pipeline without a `sample_size` in its denoiser's config renders by default:
    its `default_sample_size` latents times the VAE factor (1024 px for FLUX and Qwen-Image; the tiny
    builders set 8, so 64 px, on the pipeline object)."""
    return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
