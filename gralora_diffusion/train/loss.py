"""One micro-batch's loss: latents (VAE, optionally cached), text conditioning (optionally cached),
noise, the UNet's prediction, and the (Min-SNR, prior-preservation) diffusion loss."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .sampling import latent_stats


def encode_prompts(tokenizers, text_encoders, prompts: list[str], device):
    """SDXL's conditioning: both encoders' penultimate hidden states side by side, and the second
    encoder's pooled projection (as diffusers' pipeline and training scripts compute them)."""
    hidden = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def normalize_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """scaling_factor, and latents_mean/std when the VAE declares them (the pipeline undoes the same)."""
    stats = latent_stats(vae_config, latents)
    if stats is None:
        return latents * vae_config.scaling_factor
    return (latents - stats[0]) * vae_config.scaling_factor / stats[1]


def diffusion_loss(pred, target, timesteps, noise_scheduler, snr_gamma=None, with_prior=False, prior_loss_weight=1.0):
    """MSE (Min-SNR weighted with `snr_gamma`); with prior preservation the batch's second half is the class half."""
    from diffusers.training_utils import compute_snr

    parts = {}
    if with_prior:
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        timesteps = timesteps.chunk(2)[0]
        parts["prior_loss"] = F.mse_loss(pred_prior.float(), target_prior.float())
    if snr_gamma is None:
        loss = F.mse_loss(pred.float(), target.float())
    else:
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=snr_gamma)
        weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
        loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    parts["instance_loss"] = loss
    if with_prior:
        loss = loss + prior_loss_weight * parts["prior_loss"]
    return loss, parts


class BatchLoss:
    """`loss, parts = BatchLoss(...)(batch)`. Holds the VAE latent-distribution cache (per augmented
    item) and the text-embedding cache (per prompt, only while the text encoders are frozen)."""

    def __init__(self, cfg, pipe, unet, text_encoders, noise_scheduler, weight_dtype, device):
        self.cfg, self.pipe, self.unet, self.text_encoders = cfg, pipe, unet, text_encoders
        self.noise_scheduler, self.weight_dtype, self.device = noise_scheduler, weight_dtype, device
        self.cache_text = cfg.cache_text_embeddings and not cfg.train_text_encoder
        self.latent_cache: dict = {}
        self.text_cache: dict = {}

    def latent_params(self, batch):
        def encode(pixels):
            with torch.no_grad():
                return self.pipe.vae.encode(pixels.to(self.device, self.pipe.vae.dtype)).latent_dist.parameters

        if not self.cfg.cache_latents:
            return encode(batch["pixel_values"])
        if any(k not in self.latent_cache for k in batch["keys"]):
            for key, p in zip(batch["keys"], encode(batch["pixel_values"])):
                self.latent_cache[key] = p.detach()
        return torch.stack([self.latent_cache[k] for k in batch["keys"]])

    def text_conditioning(self, prompts):
        tokenizers = (self.pipe.tokenizer, self.pipe.tokenizer_2)
        if not self.cache_text:
            with torch.no_grad() if not self.cfg.train_text_encoder else contextlib.nullcontext():
                return encode_prompts(tokenizers, self.text_encoders, prompts, self.device)
        missing = sorted({p for p in prompts if p not in self.text_cache})
        if missing:
            with torch.no_grad():
                embeds, pooled = encode_prompts(tokenizers, self.text_encoders, missing, self.device)
            self.text_cache.update({p: (e, q) for p, e, q in zip(missing, embeds, pooled)})
        return torch.stack([self.text_cache[p][0] for p in prompts]), torch.stack([self.text_cache[p][1] for p in prompts])

    def __call__(self, batch):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        cfg, scheduler, device, dtype = self.cfg, self.noise_scheduler, self.device, self.weight_dtype
        latents = DiagonalGaussianDistribution(self.latent_params(batch)).sample()
        latents = normalize_latents(latents, self.pipe.vae.config).to(dtype)
        noise = torch.randn_like(latents)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        embeds, pooled = self.text_conditioning(batch["prompts"])
        pred = self.unet(noisy, timesteps, embeds.to(dtype), return_dict=False,
                         added_cond_kwargs={"time_ids": batch["time_ids"].to(device, dtype), "text_embeds": pooled.to(dtype)})[0]
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        return diffusion_loss(pred, target, timesteps, scheduler, cfg.snr_gamma, batch["with_prior"], cfg.prior_loss_weight)
