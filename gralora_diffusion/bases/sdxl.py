"""Stable Diffusion XL (StableDiffusionXLPipeline): a UNet with `text_time` added conditions, two CLIP
text encoders (the second with projection), DDPM ε / v training. The package's first family; its
behaviour is the one the package always had (presets, conditioning, latents, kohya names)."""

from __future__ import annotations

from .vae import scale as normalize_latents, vae_encode  # noqa: F401 (the family's contract)

PIPELINE_CLASS = "StableDiffusionXLPipeline"
DENOISER = "unet"
OBJECTIVE = "ddpm"

# Target presets (PEFT module-name suffixes).
UNET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn+ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
}
TEXT_ENCODER_PRESETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attn+mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
PRESETS = {"unet": UNET_PRESETS, "text_encoder": TEXT_ENCODER_PRESETS, "text_encoder_2": TEXT_ENCODER_PRESETS}
TRAINABLE_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
EMBEDDED = {"world": "gralora_diffusion.world.model:tiny_world_pipeline"}  # the tiny SDXL pretrained on the drawn world
# kohya/ComfyUI names are written (export_names.py: the UNet in the original sgm layout, text encoders
# lora_te1_/lora_te2_ by diffusers' convert_state_dict_to_kohya); the header field A1111 shows
KOHYA = {"ss_base_model_version": "sdxl_base_v1-0"}


def build_tiny(seed: int = 0):
    from ..tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=seed)


def encode_prompts(pipe, prompts: list[str], device, text_encoders=None) -> dict:
    """SDXL's conditioning: both encoders' penultimate hidden states side by side, and the second
    encoder's pooled projection (as diffusers' pipeline and training scripts compute them).
    `text_encoders`: the encoders to run (the trainer's wrapped ones), default the pipeline's."""
    import torch

    encoders = text_encoders or (pipe.text_encoder, pipe.text_encoder_2)
    hidden = []
    for tokenizer, encoder in zip((pipe.tokenizer, pipe.tokenizer_2), encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}


def predict(pipe, denoiser, noisy, timesteps, cond):
    """The UNet's prediction; `cond["time_ids"]` is the batch's (original size, crop, target size)."""
    dtype = noisy.dtype
    added = {"time_ids": cond["time_ids"].to(noisy.device, dtype), "text_embeds": cond["pooled_prompt_embeds"].to(dtype)}
    return denoiser(noisy, timesteps, cond["prompt_embeds"].to(dtype), added_cond_kwargs=added, return_dict=False)[0]
