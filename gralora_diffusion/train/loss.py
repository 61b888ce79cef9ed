"""One micro-batch's loss: latents (VAE, optionally cached), text conditioning (optionally cached),
noise, the UNet's prediction, and the (Min-SNR, prior-preservation) diffusion loss."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .data import EMPTY_PROMPT
from .sampling import latent_stats
from .tensor_cache import TensorCache, module_fingerprint


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

    def __init__(self, cfg, pipe, unet, text_encoders, noise_scheduler, weight_dtype, device, data_fingerprint: str = ""):
        from pathlib import Path

        self.cfg, self.pipe, self.unet, self.text_encoders = cfg, pipe, unet, text_encoders
        self.noise_scheduler, self.weight_dtype, self.device = noise_scheduler, weight_dtype, device
        self.cache_text = cfg.cache_text_embeddings and not cfg.train_text_encoder
        # beyond --embedding_cache_mb, on disk under a fingerprint of the encoder (and the images, for latents)
        folder = Path(cfg.cache_dir or Path(cfg.output_dir) / "cache")
        budget = cfg.embedding_cache_mb // 2  # half each
        self.latent_cache = TensorCache(budget, folder, lambda: "latents-" + module_fingerprint(
            pipe.vae, extra=f"{pipe.vae.dtype}|{data_fingerprint}"))
        self.text_cache = TensorCache(budget, folder, lambda: "text-" + module_fingerprint(
            *text_encoders, extra=f"{weight_dtype}|{pipe.tokenizer.model_max_length}|{len(pipe.tokenizer)}|{len(pipe.tokenizer_2)}"))

    def latent_params(self, batch):
        def encode(pixels):
            with torch.no_grad():
                return self.pipe.vae.encode(pixels.to(self.device, self.pipe.vae.dtype)).latent_dist.parameters

        if not self.cfg.cache_latents:
            return encode(batch["pixel_values"])
        if any(k not in self.latent_cache for k in batch["keys"]):
            for key, p in zip(batch["keys"], encode(batch["pixel_values"])):
                self.latent_cache[key] = (p.detach(),)
        return torch.stack([self.latent_cache[k][0].to(self.device) for k in batch["keys"]])

    def text_conditioning(self, prompts):
        """As the pipeline conditions: a dropped caption (EMPTY_PROMPT) is zeros where the pipeline's
        `force_zeros_for_empty_prompt` zeroes its unconditional embedding, else the encoded empty prompt."""
        embeds, pooled = self.encoded_prompts(prompts)
        if EMPTY_PROMPT in prompts and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            keep = torch.tensor([p != EMPTY_PROMPT for p in prompts], device=embeds.device, dtype=embeds.dtype)
            embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        return embeds, pooled

    def encoded_prompts(self, prompts):
        tokenizers = (self.pipe.tokenizer, self.pipe.tokenizer_2)
        if not self.cache_text:
            with torch.no_grad() if not self.cfg.train_text_encoder else contextlib.nullcontext():
                return encode_prompts(tokenizers, self.text_encoders, prompts, self.device)
        # one prompt at a time: a prompt's cached embedding must not depend on which prompts shared its
        # first batch (batched matmuls differ in the last bits), or a resumed run drifts from an unbroken one
        for prompt in sorted({p for p in prompts if p not in self.text_cache}):
            with torch.no_grad():
                embeds, pooled = encode_prompts(tokenizers, self.text_encoders, [prompt], self.device)
            self.text_cache[prompt] = (embeds[0], pooled[0])
        found = [self.text_cache[p] for p in prompts]
        return torch.stack([e.to(self.device) for e, _ in found]), torch.stack([q.to(self.device) for _, q in found])

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
