"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): two CLIP encoders with projection and a
T5, an MM-DiT on 2x2 patches of 16-channel latents, flow matching.

Training follows diffusers' `train_dreambooth_lora_sd3.py`: latents (x - shift)·scale, the
transformer called on unpacked latents with the scheduler's timestep, logit-normal timestep
sampling. Prompts are encoded as the pipeline encodes them for generation (T5 at its 256 tokens;
the script's 77 would condition training on other padding than inference)."""

from __future__ import annotations

from .tiny_parts import finish_tiny
from .sdxl import TEXT_ENCODER_PRESETS
from .vae import shift_and_scale as normalize_latents, vae_encode  # noqa: F401 (the family's contract)

PIPELINE_CLASS = "StableDiffusion3Pipeline"
DENOISER = "transformer"
_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
PRESETS = {
    # attn is the DreamBooth LoRA script's default (plus SD3.5's second attention, attn2, in its dual blocks)
    "transformer": {"attn": _ATTN, "attn+ff": _ATTN + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]},
    "text_encoder": TEXT_ENCODER_PRESETS,
    "text_encoder_2": TEXT_ENCODER_PRESETS,
}
TRAINABLE_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the CLIPs; text_encoder_3 is T5
OBJECTIVE = "flow"
WEIGHTING_SCHEME = "logit_normal"  # the script's default

TEXT_HIDDEN = 32  # each CLIP; their hidden states side by side are padded to T5's width
T5_WIDTH = 64
LATENT_CHANNELS = 16


def build_tiny(seed: int = 0):
    """A real `StableDiffusion3Pipeline` with random weights, offline, deterministic for `seed`
    (SD3.5's layout: RMS q/k norms, a dual-attention first block, 16 latent channels)."""
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from ..tiny import build_text_config, build_tokenizer, build_vae
    from .flux import flow_scheduler
    from .tiny_text import t5_encoder, t5_tokenizer

    tokenizer, tokenizer_2, tokenizer_3 = build_tokenizer(), build_tokenizer(), t5_tokenizer(256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_WIDTH,
                                            caption_projection_dim=32, pooled_projection_dim=2 * TEXT_HIDDEN,
                                            out_channels=LATENT_CHANNELS, pos_embed_max_size=8,
                                            dual_attention_layers=(0,), qk_norm="rms_norm")
        vae = build_vae(latent_channels=LATENT_CHANNELS, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
        text_encoder = CLIPTextModelWithProjection(build_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(build_text_config(tokenizer_2))
        text_encoder_3 = t5_encoder(tokenizer_3, d_model=T5_WIDTH)
    # SD3's scheduler: a fixed shift of 3, no dynamic shifting.
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(use_dynamic_shifting=False), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    return finish_tiny(pipe)


def encode_prompts(pipe, prompts, device, text_encoders=None):
    """The pipeline's `encode_prompt`; `text_encoders`: the trainer's TRAINABLE_TEXT_ENCODERS, in order (default the pipeline's)."""
    from .encoders import text_encoders_in

    with text_encoders_in(pipe, TRAINABLE_TEXT_ENCODERS, text_encoders):
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=device, do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def predict(pipe, denoiser, noisy_latents, timesteps, cond):
    device, dtype = noisy_latents.device, noisy_latents.dtype
    return denoiser(
        hidden_states=noisy_latents,
        timestep=timesteps.to(device).expand(noisy_latents.shape[0]),
        encoder_hidden_states=cond["prompt_embeds"].to(device, dtype),
        pooled_projections=cond["pooled_prompt_embeds"].to(device, dtype),
        return_dict=False,
    )[0]
