"""The flow-matching objective of SD3, FLUX.1, FLUX.2 and Qwen-Image, as diffusers' DreamBooth
scripts train it: σ drawn through `compute_density_for_timestep_sampling` on the scheduler's own
training sigmas, noisy = (1 - σ)·x + σ·noise, target = noise - x, per-sample MSE weighted by
`compute_loss_weighting_for_sd3`, and prior preservation on the batch's second half."""

from __future__ import annotations

import torch

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def training_scheduler(pipe):
    """A fresh copy of the pipeline's flow scheduler: its training sigmas and timesteps, untouched
    by any `set_timesteps` an inference run made on the pipeline's own one."""
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


def sample_timesteps(scheduler, batch_size: int, weighting_scheme: str = "none", logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29, device="cpu", generator=None):
    """(sigmas, timesteps), one per sample: u ~ the scheme's density, index = u·T into the schedule.
    `timesteps` are in the scheduler's units (σ·1000 before shifting), as the pipelines pass them."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme={weighting_scheme!r}: pick one of {', '.join(WEIGHTING_SCHEMES)}.")
    u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean, logit_std, mode_scale,
                                              device="cpu", generator=generator)
    steps = scheduler.config.num_train_timesteps
    # 'mode' can reach u = 1 exactly (at a drawn 0); the scripts would index past the end there.
    indices = (u * steps).long().clamp(0, steps - 1)
    return scheduler.sigmas[indices].to(device), scheduler.timesteps[indices].to(device)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


def noisy_and_target(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """The flow's point at σ and its velocity target: ((1 - σ)·x + σ·noise, noise - x)."""
    s = _per_sample(sigmas, latents)
    return (1.0 - s) * latents + s * noise, noise - latents


def flow_loss(pred, target, sigmas, weighting_scheme: str = "none", with_prior: bool = False, prior_loss_weight: float = 1.0):
    """Weighted MSE, mean over each sample then over the batch; with prior preservation the batch's
    second half is the class half. Returns (loss, parts) as `train.loss.diffusion_loss` does."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weighting = compute_loss_weighting_for_sd3(weighting_scheme, _per_sample(sigmas, pred).float())

    def mse(p, t, w):
        return (w * (p.float() - t.float()) ** 2).reshape(t.shape[0], -1).mean(1).mean()

    parts = {}
    if with_prior:
        (pred, pred_prior), (target, target_prior), (weighting, weighting_prior) = (
            x.chunk(2) for x in (pred, target, weighting))
        parts["prior_loss"] = mse(pred_prior, target_prior, weighting_prior)
    loss = parts["instance_loss"] = mse(pred, target, weighting)
    if with_prior:
        loss = loss + prior_loss_weight * parts["prior_loss"]
    return loss, parts
