"""VAE steps several families share: encoding pixels to the latent distribution's parameters (what
the trainer caches), SD/SDXL's scaling (with latents_mean/std when the VAE declares them), and the
(x - shift_factor)·scaling_factor normalization of SD3 and FLUX.1."""

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
