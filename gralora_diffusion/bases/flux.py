"""FLUX.1 (`FluxPipeline`): CLIP (pooled) + T5 (sequence) text encoders, an MM-DiT with double-
and single-stream blocks on 2x2-packed 16-channel latents, flow matching, guidance distillation (dev).

Training follows diffusers' `train_dreambooth_lora_flux.py`: latents (x - shift)·scale, packed
for the transformer and unpacked after, timestep/1000, guidance 3.5 when the model embeds it,
text ids zeros, image ids the latent grid."""

from __future__ import annotations

from .tiny_parts import finish_tiny
from .sdxl import TEXT_ENCODER_PRESETS
from .vae import default_resolution, shift_and_scale as normalize_latents, vae_encode  # noqa: F401 (the family's contract)

PIPELINE_CLASS = "FluxPipeline"
DENOISER = "transformer"
_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# attn+ff is the DreamBooth LoRA script's default target list.
PRESETS = {
    "transformer": {"attn": _ATTN, "attn+ff": _ATTN + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]},
    "text_encoder": TEXT_ENCODER_PRESETS,
}
TRAINABLE_TEXT_ENCODERS = ("text_encoder",)  # CLIP; text_encoder_2 is T5
OBJECTIVE = "flow"
WEIGHTING_SCHEME = "none"  # the script's default
GUIDANCE_SCALE = 3.5  # the script's (and FLUX.1-dev pipeline's) default guidance input
MAX_SEQUENCE_LENGTH = 512

TEXT_HIDDEN = 32
LATENT_CHANNELS = 16


def flow_scheduler(**overrides):
    """FLUX.1-dev's scheduler settings (`overrides` for other flow families)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{**dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                     base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                     max_image_seq_len=4096), **overrides})


def build_tiny(seed: int = 0):
    """A real `FluxPipeline` with random weights, offline, deterministic for `seed` (FLUX.1-dev's
    layout: 16 latent channels, guidance embedding, one double and one single block)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from ..tiny import build_text_config, build_tokenizer, build_vae
    from .tiny_text import t5_encoder, t5_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), t5_tokenizer(MAX_SEQUENCE_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN,
                                             pooled_projection_dim=TEXT_HIDDEN, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        vae = build_vae(latent_channels=LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
        text_encoder = CLIPTextModel(build_text_config(tokenizer, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN))
        text_encoder_2 = t5_encoder(tokenizer_2, d_model=TEXT_HIDDEN)
    pipe = FluxPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    return finish_tiny(pipe, sample_size=8)


def encode_prompts(pipe, prompts, device, text_encoders=None):
    """The pipeline's `encode_prompt`; `text_encoders`: the trainer's TRAINABLE_TEXT_ENCODERS, in order (default the pipeline's)."""
    from .encoders import text_encoders_in

    with text_encoders_in(pipe, TRAINABLE_TEXT_ENCODERS, text_encoders):
        # text_ids (zeros, not batch-first) are rebuilt in `predict`.
        embeds, pooled, _ = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def predict(pipe, denoiser, noisy_latents, timesteps, cond):
    import torch

    batch, channels, height, width = noisy_latents.shape
    device, dtype = noisy_latents.device, noisy_latents.dtype
    embeds = cond["prompt_embeds"].to(device, dtype)
    guidance = torch.full((batch,), GUIDANCE_SCALE, device=device) if denoiser.config.guidance_embeds else None
    out = denoiser(
        hidden_states=pipe._pack_latents(noisy_latents, batch, channels, height, width),
        timestep=timesteps.to(device, dtype) / 1000,
        guidance=guidance,
        pooled_projections=cond["pooled_prompt_embeds"].to(device, dtype),
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
        img_ids=pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype),
        return_dict=False,
    )[0]
    # _unpack_latents takes pixel sizes and the VAE factor; with factor 1 the sizes are the latent's.
    return pipe._unpack_latents(out, height, width, 1)
