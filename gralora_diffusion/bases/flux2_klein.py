"""FLUX.2 [klein] (`Flux2KleinPipeline`): a Qwen3 text encoder (three hidden layers stacked), a DiT
whose single-stream blocks fuse attention and MLP projections (`attn.to_qkv_mlp_proj`, `attn.to_out`),
on 2x2-patchified latents normalized by the VAE's batch-norm statistics; flow matching. The base of
PEFT's image-generation benchmark.

Training follows diffusers' `train_dreambooth_lora_flux2_klein.py`: latents patchified, then
(x - bn_mean)/bn_std; the patchified latents are the "unpacked" layout `predict` takes; the
transformer sees them as a sequence with 4-axis (t, h, w, l) ids, timestep/1000. That script encodes
images with the latent distribution's mode, not a sample (LATENTS)."""

from __future__ import annotations

from .tiny_parts import finish_tiny
from .vae import default_resolution, vae_encode  # noqa: F401 (the family's contract)

PIPELINE_CLASS = "Flux2KleinPipeline"
DENOISER = "transformer"
# The single-stream blocks' `attn.to_out` is a Linear, the double blocks' `attn.to_out` a ModuleList:
# only names with the block index tell them apart (as diffusers' and DiffSynth's klein scripts list
# them); 48 covers FLUX.2 [dev], klein 4B has 20, 9B 24.
MAX_SINGLE_BLOCKS = 48
_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_qkv_mlp_proj",
         *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(MAX_SINGLE_BLOCKS)]]
PRESETS = {"transformer": {"attn": _ATTN, "attn+ff": _ATTN + ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]}}
TRAINABLE_TEXT_ENCODERS = ()  # Qwen3, an LLM
OBJECTIVE = "flow"
WEIGHTING_SCHEME = "none"
GUIDANCE_SCALE = 3.5  # the script's guidance input, used only by a transformer that embeds guidance
LATENTS = "mode"  # the script trains on the latent distribution's mode

TEXT_HIDDEN = 16
TEXT_LAYERS = 27  # the pipeline stacks hidden states 9, 18 and 27
LATENT_CHANNELS = 8


def build_tiny(seed: int = 0):
    """A real `Flux2KleinPipeline` (klein base: not step-distilled, no guidance embedding) with random
    weights and random batch-norm statistics, offline, deterministic for `seed`."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .flux import flow_scheduler
    from .tiny_text import qwen_tokenizer

    tokenizer = qwen_tokenizer(512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN,
                                              timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
        vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                                 norm_num_groups=8, sample_size=64)
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    pipe = Flux2KleinPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    return finish_tiny(pipe, sample_size=8)


def encode_prompts(pipe, prompts, device):
    # text_ids are the same for every prompt of a length; `predict` rebuilds them.
    embeds, _ = pipe.encode_prompt(list(prompts), device=device)
    return {"prompt_embeds": embeds}


def normalize_latents(pipe, latents):
    import torch

    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    return (pipe._patchify_latents(latents) - mean) / std


def predict(pipe, denoiser, noisy_latents, timesteps, cond):
    import torch

    batch, _, height, width = noisy_latents.shape
    device, dtype = noisy_latents.device, noisy_latents.dtype
    embeds = cond["prompt_embeds"].to(device, dtype)
    packed = pipe._pack_latents(noisy_latents)
    img_ids = pipe._prepare_latent_ids(noisy_latents).to(device)
    guidance = torch.full((batch,), GUIDANCE_SCALE, device=device) if denoiser.config.guidance_embeds else None
    out = denoiser(hidden_states=packed, timestep=timesteps.to(device, dtype).expand(batch) / 1000, guidance=guidance,
                   encoder_hidden_states=embeds, txt_ids=pipe._prepare_text_ids(embeds).to(device), img_ids=img_ids,
                   return_dict=False)[0]
    return pipe._unpack_latents_with_ids(out[:, : packed.shape[1]], img_ids, height, width)
