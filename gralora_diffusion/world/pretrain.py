"""Pretraining the world model on a CPU: the VAE, then its decoder alone (the latents stay put,
so it can run beside the UNet), then the UNet with both text encoders on cached latents.

Every stage is deterministic for its seed and resumable: the batch of step t is drawn from
(seed, t), and a checkpoint (models, optimizer, schedule, step) is written atomically every
`ckpt_every` steps under the run folder, so a killed job continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup

from .draw import render_batch

VAE_SEED, UNET_SEED = 1, 2  # render streams (the evaluator uses 3, held-out tests 4+)


def to_unit(images) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float in [-1, 1]."""
    return torch.as_tensor(images).float().div(127.5).sub(1)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill leaves the old checkpoint or the new one


def run_stage(run_dir: Path, name: str, modules: dict, params, steps: int, step_fn, lr: float, ckpt_every: int = 200,
              warmup: int = 100, log_every: int = 25, ema=None, stop_at: int | None = None) -> dict:
    """Train `modules` (name -> nn.Module) with AdamW + cosine schedule for `steps`; `step_fn(step, extra) -> (loss,
    info)` where `extra` is a dict saved with the checkpoint; `ema` (diffusers' EMAModel over `params`) steps after each
    update; `stop_at` ends early on the schedule of `steps`. Resumes from run_dir/name.pt. Returns the state dicts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt, log = run_dir / f"{name}.pt", run_dir / f"{name}.log"
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    step, extra = 0, {}
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, extra = state["step"], state.get("extra", {})
        if ema is not None:
            ema.load_state_dict(state["ema"])
    start = time.perf_counter()
    with log.open("a") as out:
        while step < min(steps, stop_at or steps):
            loss, info = step_fn(step, extra)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if ema is not None:
                ema.step(params)
            step += 1
            if step % log_every == 0 or step in (steps, stop_at):
                out.write(json.dumps({"step": step, "loss": round(loss.item(), 5), "s": round(time.perf_counter() - start, 1), **info}) + "\n")
                out.flush()
            if step % ckpt_every == 0 or step in (steps, stop_at):
                save_checkpoint(ckpt, {"modules": {k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                                       "schedule": schedule.state_dict(), "step": step, "extra": extra,
                                       "ema": None if ema is None else ema.state_dict()})
    return {k: m.state_dict() for k, m in modules.items()}


def _recon_loss(recon, x):
    # L1 plus an L1 on image gradients: the probe's VAE came back soft (checks turned grey).
    grad = (F.l1_loss(recon[..., 1:, :] - recon[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])
            + F.l1_loss(recon[..., 1:] - recon[..., :-1], x[..., 1:] - x[..., :-1]))
    return F.l1_loss(recon, x) + 0.5 * grad


def train_vae(run_dir: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0, kl_weight: float = 1e-6,
              stop_at: int | None = None):
    """Stage 1: the whole VAE (L1 + gradient L1 + a light KL)."""
    from .model import world_vae

    torch.manual_seed(seed)
    vae = world_vae()

    def step_fn(step, extra):
        x = to_unit(render_batch(VAE_SEED, step * batch, batch)[0])
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean()
        rec = _recon_loss(recon, x)
        return rec + kl_weight * kl, {"rec": round(rec.item(), 4), "kl": round(kl.item(), 1)}

    return run_stage(run_dir, "vae", {"vae": vae}, list(vae.parameters()), steps, step_fn, lr, stop_at=stop_at)


def load_vae(run_dir: Path, stage: str = "vae"):
    from .model import world_vae

    vae = world_vae()
    vae.load_state_dict(torch.load(run_dir / f"{stage}.pt", weights_only=True)["modules"]["vae"])
    return vae.eval()


def train_decoder(run_dir: Path, steps: int, batch: int = 32, lr: float = 5e-4, seed: int = 0, stop_at: int | None = None):
    """Stage 2: the decoder alone on the frozen encoder's latent means (what the UNet is trained on)."""
    torch.manual_seed(seed)
    vae = load_vae(run_dir)
    vae.requires_grad_(False)
    decoder = torch.nn.ModuleList([vae.post_quant_conv, vae.decoder]).train()
    decoder.requires_grad_(True)

    def step_fn(step, extra):
        x = to_unit(render_batch(VAE_SEED, (10**7) + step * batch, batch)[0])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = _recon_loss(vae.decode(z).sample, x)
        return rec, {}

    return run_stage(run_dir, "decoder", {"vae": vae}, list(decoder.parameters()), steps, step_fn, lr, warmup=20, stop_at=stop_at)


@torch.no_grad()
def vae_psnr(vae, count: int = 256, seed: int = 9) -> float:
    x = to_unit(render_batch(seed, 0, count)[0])
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 64]).latent_dist.mean).sample for i in range(0, count, 64)]).clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2)
    return float(10 * torch.log10(1 / mse))
