"""One micro-batch's loss: latents (VAE, optionally cached), text conditioning (optionally cached),
noise, the denoiser's prediction, and the (Min-SNR, prior-preservation) diffusion loss. What differs
per base family (encoding, latent scaling, the denoiser's inputs, DDPM or flow matching) is asked
of the family (`bases`)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .data import EMPTY_PROMPT
from .tensor_cache import TensorCache, module_fingerprint


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
    item) and the text-conditioning cache (per prompt, only while the text encoders are frozen)."""

    def __init__(self, cfg, pipe, family, denoiser, text_encoders, noise_scheduler, weight_dtype, device,
                 data_fingerprint: str = ""):
        import inspect
        from pathlib import Path

        self.cfg, self.pipe, self.family, self.denoiser = cfg, pipe, family, denoiser
        self.noise_scheduler, self.weight_dtype, self.device = noise_scheduler, weight_dtype, device
        # the trainer's (wrapped) text encoders, for families whose encode_prompts takes them
        takes = "text_encoders" in inspect.signature(family.encode_prompts).parameters
        self.encode_kwargs = {"text_encoders": text_encoders} if takes and text_encoders else {}
        self.cache_text = cfg.cache_text_embeddings and not cfg.train_text_encoder
        # beyond --embedding_cache_mb, on disk under a fingerprint of the encoders (and the images, for latents)
        folder = Path(cfg.cache_dir or Path(cfg.output_dir) / "cache")
        budget = cfg.embedding_cache_mb // 2  # half each
        parts = sorted((name, part) for name, part in pipe.components.items() if part is not None)
        encoders = [part for name, part in parts if name.startswith("text_encoder")]
        tokenizers = [part for name, part in parts if name.startswith("tokenizer")]
        shape = "|".join(f"{getattr(t, 'model_max_length', '')}:{len(t)}" for t in tokenizers)
        self.latent_cache = TensorCache(budget, folder, lambda: "latents-" + module_fingerprint(
            pipe.vae, extra=f"{family.name}|{pipe.vae.dtype}|{data_fingerprint}"))
        self.text_cache = TensorCache(budget, folder, lambda: "text-" + module_fingerprint(
            *encoders, extra=f"{family.name}|{weight_dtype}|{shape}"))
        self.cond_keys: list[str] | None = None  # the family's conditioning names, in cache order

    def latent_params(self, batch):
        def encode(pixels):
            with torch.no_grad():
                return self.family.vae_encode(self.pipe, pixels.to(self.device))

        if not self.cfg.cache_latents:
            return encode(batch["pixel_values"])
        if any(k not in self.latent_cache for k in batch["keys"]):
            for key, p in zip(batch["keys"], encode(batch["pixel_values"])):
                self.latent_cache[key] = (p.detach(),)
        return torch.stack([self.latent_cache[k][0].to(self.device) for k in batch["keys"]])

    def encode(self, prompts) -> dict:
        return self.family.encode_prompts(self.pipe, prompts, self.device, **self.encode_kwargs)

    def text_conditioning(self, prompts) -> dict:
        """As the pipeline conditions: a dropped caption (EMPTY_PROMPT) is zeros where the pipeline's
        `force_zeros_for_empty_prompt` zeroes its unconditional embedding, else the encoded empty prompt."""
        cond = self.encoded_prompts(prompts)
        if EMPTY_PROMPT in prompts and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            keep = torch.tensor([p != EMPTY_PROMPT for p in prompts], device=self.device)
            cond = {k: v * keep.view(-1, *[1] * (v.dim() - 1)).to(v.dtype) if v.is_floating_point() else v
                    for k, v in cond.items()}
        return cond

    def encoded_prompts(self, prompts) -> dict:
        if not self.cache_text:
            with torch.no_grad() if not self.cfg.train_text_encoder else contextlib.nullcontext():
                return self.encode(prompts)
        # one prompt at a time: a prompt's cached embedding must not depend on which prompts shared its
        # first batch (batched matmuls differ in the last bits), or a resumed run drifts from an unbroken one
        for prompt in sorted({p for p in prompts if p not in self.text_cache}):
            with torch.no_grad():
                encoded = self.encode([prompt])
            self.cond_keys = self.cond_keys or sorted(encoded)
            self.text_cache[prompt] = tuple(encoded[k] for k in self.cond_keys)
        if self.cond_keys is None:  # every prompt came from an earlier run's files: learn the names once
            with torch.no_grad():
                self.cond_keys = sorted(self.encode(prompts[:1]))
        rows = [dict(zip(self.cond_keys, (t.to(self.device) for t in self.text_cache[p]))) for p in prompts]
        join = getattr(self.family.module, "concat_cond", None)  # rows of different lengths (Qwen-Image's prompts)
        return join(rows) if join else {k: torch.cat([row[k] for row in rows]) for k in rows[0]}

    def __call__(self, batch):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        cfg, device, dtype = self.cfg, self.device, self.weight_dtype
        latents = DiagonalGaussianDistribution(self.latent_params(batch)).sample()
        latents = self.family.normalize_latents(self.pipe, latents).to(dtype)
        noise = torch.randn_like(latents)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=device, dtype=latents.dtype)
        cond = {k: v.to(device) for k, v in self.text_conditioning(batch["prompts"]).items()}
        cond["time_ids"] = batch["time_ids"].to(device, dtype)  # SDXL's added conditions; other families ignore it
        step = flow_step if self.family.objective == "flow" else ddpm_step
        return step(self, latents, noise, cond, batch["with_prior"])


def training_scheduler(pipe, family):
    """The noise schedule training draws from: DDPM from the pipeline's config, or the flow scheduler's copy."""
    if family.objective == "flow":
        from ..bases.flow import training_scheduler as flow_scheduler

        return flow_scheduler(pipe)
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def ddpm_step(loss: BatchLoss, latents, noise, cond, with_prior: bool):
    """DDPM: a uniform timestep, the scheduler's noise, ε or v target, Min-SNR with --snr_gamma."""
    cfg, scheduler = loss.cfg, loss.noise_scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = loss.family.predict(loss.pipe, loss.denoiser, noisy, timesteps, cond)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return diffusion_loss(pred, target, timesteps, scheduler, cfg.snr_gamma, with_prior, cfg.prior_loss_weight)


def flow_step(loss: BatchLoss, latents, noise, cond, with_prior: bool):
    """Flow matching (SD3, FLUX, FLUX.2, Qwen-Image): bases/flow.py's σ density, flow point and weighting
    (diffusers' compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3)."""
    from ..bases import flow

    cfg, scheme = loss.cfg, getattr(loss.family.module, "WEIGHTING_SCHEME", "none")
    sigmas, timesteps = flow.sample_timesteps(loss.noise_scheduler, latents.shape[0], scheme, device=latents.device)
    noisy, target = flow.noisy_and_target(latents, noise, sigmas)
    pred = loss.family.predict(loss.pipe, loss.denoiser, noisy, timesteps, cond)
    return flow.flow_loss(pred, target, sigmas, scheme, with_prior, cfg.prior_loss_weight)
