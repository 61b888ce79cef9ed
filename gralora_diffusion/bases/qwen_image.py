"""Qwen-Image (`QwenImagePipeline`): a Qwen2.5-VL text encoder (last hidden state after a system
prompt, padded to the batch's longest prompt with a mask), an MM-DiT on 2x2 patches of a video VAE's
latents (a frame axis of 1), flow matching.

Training follows diffusers' `train_dreambooth_lora_qwen_image.py`: latents (x - latents_mean)/latents_std
per channel, kept 5-D (batch, channels, frame, height, width) — the layout `predict` takes — and
packed for the transformer with img_shapes, timestep/1000, the prompt mask (None when all ones)."""

from __future__ import annotations

from .tiny_parts import finish_tiny
from .vae import default_resolution  # noqa: F401 (the family's contract)
from .vae import vae_encode as _vae_encode

PIPELINE_CLASS = "QwenImagePipeline"
DENOISER = "transformer"
_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
PRESETS = {"transformer": {"attn": _ATTN, "attn+ff": _ATTN + ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]}}
TRAINABLE_TEXT_ENCODERS = ()  # Qwen2.5-VL, an LLM
OBJECTIVE = "flow"
WEIGHTING_SCHEME = "none"
GUIDANCE_SCALE = 1.0  # only a guidance-distilled transformer takes one; Qwen-Image does not

TEXT_HIDDEN = 32
LATENT_CHANNELS = 4


def build_tiny(seed: int = 0):
    """A real `QwenImagePipeline` with random weights (and random per-channel latent statistics),
    offline, deterministic for `seed`."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .flux import flow_scheduler
    from .tiny_text import qwen_tokenizer

    tokenizer = qwen_tokenizer(1024)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                                  num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                                  joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6))
        stats = torch.Generator().manual_seed(seed)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=(torch.randn(LATENT_CHANNELS, generator=stats) * 0.5).tolist(),
                                     latents_std=(torch.rand(LATENT_CHANNELS, generator=stats) + 0.5).tolist())
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                               fullatt_block_indexes=[0]),
            # image/video markers past the tiny vocabulary: text prompts never contain them
            image_token_id=len(tokenizer) + 1, video_token_id=len(tokenizer) + 2,
            vision_start_token_id=len(tokenizer) + 3, vision_end_token_id=len(tokenizer) + 4))
    # Qwen-Image's scheduler settings.
    scheduler = flow_scheduler(shift=1.0, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return finish_tiny(pipe, sample_size=8)


def encode_prompts(pipe, prompts, device):
    """Embeddings padded to the batch's longest prompt, and the mask (always a tensor here, so rows
    cached from different calls can be joined: `concat_cond`)."""
    import torch

    embeds, mask = pipe.encode_prompt(list(prompts), device=device)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


def concat_cond(conds: list[dict]) -> dict:
    """Join `encode_prompts` outputs (or cached rows) of different lengths: each padded with zeros to
    the longest, its mask with zeros, so the transformer ignores the padding (as the script does for
    prior preservation's class prompts)."""
    import torch
    import torch.nn.functional as F

    longest = max(c["prompt_embeds"].shape[1] for c in conds)

    def padded(t):
        return F.pad(t, (0, 0) * (t.ndim - 2) + (0, longest - t.shape[1]))

    return {key: torch.cat([padded(c[key]) for c in conds]) for key in ("prompt_embeds", "prompt_embeds_mask")}


def vae_encode(pipe, pixels):
    """Images (batch, 3, H, W) through the video VAE as one-frame clips."""
    return _vae_encode(pipe, pixels.unsqueeze(2) if pixels.ndim == 4 else pixels)


def _stats(pipe, latents):
    import torch

    config = pipe.vae.config
    return tuple(torch.tensor(v, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
                 for v in (config.latents_mean, config.latents_std))


def normalize_latents(pipe, latents):
    mean, std = _stats(pipe, latents)
    return (latents - mean) / std


def predict(pipe, denoiser, noisy_latents, timesteps, cond):
    import torch

    batch, channels, _, height, width = noisy_latents.shape
    device, dtype = noisy_latents.device, noisy_latents.dtype
    mask = cond["prompt_embeds_mask"].to(device)
    guidance = torch.full((batch,), GUIDANCE_SCALE, device=device) if denoiser.config.guidance_embeds else None
    out = denoiser(
        hidden_states=pipe._pack_latents(noisy_latents, batch, channels, height, width),
        timestep=timesteps.to(device, dtype).expand(batch) / 1000,
        guidance=guidance,
        encoder_hidden_states_mask=None if mask.all() else mask,
        encoder_hidden_states=cond["prompt_embeds"].to(device, dtype),
        img_shapes=[[(1, height // 2, width // 2)]] * batch,
        return_dict=False,
    )[0]
    # _unpack_latents takes pixel sizes and the VAE factor; with factor 1 the sizes are the latent's.
    return pipe._unpack_latents(out, height, width, 1)
