"""VAE steps several families share: encoding pixels to the latent distribution's parameters (what
the trainer caches), and the (x - shift_factor)·scaling_factor normalization of SD3 and FLUX.1."""

from __future__ import annotations


def vae_encode(pipe, pixels):
    return pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.parameters


def shift_and_scale(pipe, latents):
    config = pipe.vae.config
    return (latents - config.shift_factor) * config.scaling_factor
