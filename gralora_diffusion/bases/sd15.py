"""Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`): one CLIP text encoder, a UNet, DDPM ε/v.

Training follows diffusers' `train_dreambooth_lora.py`: latents × scaling_factor, the text
encoder's last hidden state as the UNet's context."""

from __future__ import annotations

from .tiny_parts import finish_tiny
from .sdxl import TEXT_ENCODER_PRESETS, UNET_PRESETS, normalize_latents  # noqa: F401 (scaling_factor, as SDXL)
from .vae import vae_encode  # noqa: F401 (the family's contract)

PIPELINE_CLASS = "StableDiffusionPipeline"
DENOISER = "unet"
PRESETS = {"unet": UNET_PRESETS, "text_encoder": TEXT_ENCODER_PRESETS}
TRAINABLE_TEXT_ENCODERS = ("text_encoder",)
OBJECTIVE = "ddpm"

TEXT_HIDDEN = 32


def build_tiny(seed: int = 0):
    """A real `StableDiffusionPipeline` with random weights, offline, deterministic for `seed`:
    SD 1.5's layout (one CLIP encoder, 768→32 wide context, 8x VAE with scaling 0.18215, PNDM)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from ..tiny import build_text_config, build_tokenizer, build_unet, build_vae

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(cross_attention_dim=TEXT_HIDDEN, addition_embed_type=None, addition_time_embed_dim=None,
                          projection_class_embeddings_input_dim=None)
        vae = build_vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(build_text_config(tokenizer, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN))
    # SD 1.5's scheduler settings.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return finish_tiny(pipe)


def encode_prompts(pipe, prompts, device, text_encoders=None):
    """The pipeline's `encode_prompt`; `text_encoders`: the trainer's TRAINABLE_TEXT_ENCODERS, in order (default the pipeline's)."""
    from .encoders import text_encoders_in

    with text_encoders_in(pipe, TRAINABLE_TEXT_ENCODERS, text_encoders):
        embeds, _ = pipe.encode_prompt(list(prompts), device, 1, do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds}


def predict(pipe, denoiser, noisy_latents, timesteps, cond):
    return denoiser(noisy_latents, timesteps, cond["prompt_embeds"].to(noisy_latents.dtype), return_dict=False)[0]
