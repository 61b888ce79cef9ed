"""A tiny Stable Diffusion XL built offline with random weights.

Same architecture family as SDXL base (two CLIP text encoders, the second with projection;
a UNet with `text_time` added conditions and linear-projection transformer blocks; an 8x VAE;
Euler), shrunk so a 64x64 image in 2 steps takes a fraction of a second on a CPU. Every
Linear width is divisible by 8, so GraLoRA's k in {1, 2, 4, 8} works on every target.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

TEXT_HIDDEN = 32  # each text encoder; the UNet's cross-attention context is both concatenated
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8
MAX_LENGTH = 77
TINY_MODEL_ID = "gralora-diffusion/tiny-sdxl"


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A byte-level BPE vocabulary with no merges: every character is a token, as CLIP's
    tokenizer does before merging. Enough to turn any prompt into ids, and no download."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file


def build_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = _write_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_LENGTH)


def build_text_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    """The tiny text encoders' config; `overrides` replace any of its fields (the world model's are wider)."""
    return CLIPTextConfig(**{**dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden state
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=TEXT_PROJECTION,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ), **overrides})


# The tiny UNet's config (export reads layers_per_block from it without building the model).
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 1),
    cross_attention_dim=2 * TEXT_HIDDEN,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_PROJECTION,
    norm_num_groups=8,
)


def build_unet(**overrides) -> UNet2DConditionModel:
    """The tiny UNet; `overrides` replace any of its config fields."""
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_vae(**overrides) -> AutoencoderKL:
    # Four levels: the same 8x downsampling as SDXL's VAE, so 64 px images give 8x8 latents.
    return AutoencoderKL(**{**dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's
    ), **overrides})


def build_scheduler() -> EulerDiscreteScheduler:
    # SDXL base's scheduler settings.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def tiny_sdxl_pipeline(seed: int = 0, device=None, dtype=None) -> StableDiffusionXLPipeline:
    """Build a real `StableDiffusionXLPipeline` with random weights, offline and deterministic for `seed`."""
    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer()
    # fork_rng: building the model must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet()
        vae = build_vae()
        text_encoder = CLIPTextModel(build_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(build_text_config(tokenizer_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()
    pipe.set_progress_bar_config(disable=True)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def save_tiny_sdxl(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline with `save_pretrained`, so every `--pretrained_model_name_or_path` path works on it."""
    from .bases import save_tiny

    return save_tiny("sdxl", directory, seed)
