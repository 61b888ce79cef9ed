"""Stage 3: the UNet and both text encoders, trained jointly on cached VAE latents of world renders.

As in diffusers' SDXL training script: epsilon prediction on DDPM noise with the SDXL scheduler's
betas, min-SNR-5 loss weights (`compute_snr`), an EMA of the weights (`EMAModel`), and 10 % of
captions dropped, as zeros (the pipeline's `force_zeros_for_empty_prompt` unconditional input).
Scenes in draw.HELD_OUT are left out, so the base model's prompt following is measured on new scenes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr

from .draw import BACKGROUNDS, COLOURS, HELD_OUT, OBJECTS, SIZE, render_batch
from .pretrain import UNET_SEED, load_vae, run_stage, to_unit

CACHE_RENDERS = 12_000
DROP_CAPTION = 0.1
SNR_GAMMA = 5.0


@torch.no_grad()
def cache_latents(run_dir: Path, count: int = CACHE_RENDERS) -> dict:
    """Encode `count` renders (held-out scenes dropped) with the stage-1 encoder; latents are scaled to unit std."""
    path = run_dir / "latents.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    vae = load_vae(run_dir)
    latents, captions = [], []
    colour_names = list(COLOURS)
    for start in range(0, count, 500):
        images, labels, texts = render_batch(UNET_SEED, start, 500)
        keep = [i for i, (o, c, b) in enumerate(labels) if (OBJECTS[o], colour_names[c], BACKGROUNDS[b]) not in HELD_OUT]
        x = to_unit(images[keep])
        latents.append(vae.encode(x).latent_dist.mean)
        captions += [texts[i] for i in keep]
    latents = torch.cat(latents)
    scaling = float(1 / latents.std())
    cache = {"latents": latents * scaling, "captions": captions, "scaling_factor": scaling}
    torch.save(cache, path)
    return cache


def encode_text(pipe, captions: list[str]):
    """The SDXL pipeline's text path (penultimate hidden states of both encoders; the second's projection pooled)."""
    embeds = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), out[0]


def train_unet(run_dir: Path, steps: int, batch: int = 32, lr: float = 5e-4, seed: int = 0, stop_at: int | None = None):
    from .model import build_world_pipeline

    cache = cache_latents(run_dir)
    latents, captions = cache["latents"], cache["captions"]
    pipe = build_world_pipeline(seed=seed)
    unet, te1, te2 = pipe.unet.train(), pipe.text_encoder.train(), pipe.text_encoder_2.train()
    params = [p for m in (unet, te1, te2) for p in m.parameters()]
    ema = EMAModel(params, decay=0.9995, use_ema_warmup=True, power=2 / 3)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)

    def step_fn(step, extra):
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        prompt_embeds, pooled = encode_text(pipe, [captions[i] for i in idx.tolist()])
        keep = (torch.rand(batch, generator=gen) >= DROP_CAPTION).float()
        prompt_embeds, pooled = prompt_embeds * keep[:, None, None], pooled * keep[:, None]
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, prompt_embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(batch, -1)}).sample
        snr = compute_snr(noise_scheduler, t)
        weights = torch.minimum(snr, torch.full_like(snr, SNR_GAMMA)) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        return loss, {}

    run_stage(run_dir, "unet", {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}, params, steps, step_fn, lr,
              warmup=200, ckpt_every=250, ema=ema, stop_at=stop_at)
