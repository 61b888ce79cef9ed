"""The world model's architecture: tiny.py's SDXL shrunk family, widened where the probe found it
too small (UNet (64, 128), a 4-level VAE (16, 32, 64, 64), 3-layer text encoders of width 64).
Still SDXL's: two CLIP text encoders (the second with projection), `text_time` added conditions,
an 8x VAE, SDXL's scheduler. Weights ship as fp16 safetensors in gralora_diffusion/world/weights/."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ..tiny import TIME_EMBED_DIM, build_scheduler, build_text_config, build_tokenizer, build_unet, build_vae
from .draw import SIZE

WORLD_MODEL_ID = "gralora-diffusion/tiny-world"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEXT_HIDDEN = 64
TEXT_PROJECTION = 64
COMPONENT_FILES = {"unet": "unet.safetensors", "vae": "vae.safetensors",
                   "text_encoder": "text_encoder.safetensors", "text_encoder_2": "text_encoder_2.safetensors"}


def world_vae(scaling_factor: float = 1.0):
    return build_vae(block_out_channels=(16, 32, 64, 64), norm_num_groups=8, sample_size=SIZE, scaling_factor=scaling_factor)


def world_unet():
    return build_unet(
        sample_size=SIZE // 8, block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(4, 8),
        cross_attention_dim=2 * TEXT_HIDDEN, projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_PROJECTION,
    )


def world_text_encoders(tokenizer):
    config = build_text_config(tokenizer, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
                               num_hidden_layers=3, projection_dim=TEXT_PROJECTION)
    return CLIPTextModel(config), CLIPTextModelWithProjection(config)


def build_world_pipeline(seed: int = 0, scaling_factor: float = 1.0) -> StableDiffusionXLPipeline:
    """The world architecture with fresh random weights (deterministic for `seed`): what pretraining starts from."""
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = world_unet(), world_vae(scaling_factor)
        text_encoder, text_encoder_2 = world_text_encoders(tokenizer)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=build_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_world_pipeline(device=None, dtype=None, weights_dir: str | Path = WEIGHTS_DIR) -> StableDiffusionXLPipeline:
    """The tiny SDXL pretrained on the drawn world (weights shipped with the package; nothing downloads).
    fp32 on the CPU unless `device` / `dtype` say otherwise."""
    import json

    from safetensors.torch import load_file

    from ..errors import GraloraConfigError

    weights_dir = Path(weights_dir)
    meta = weights_dir / "world.json"
    if not meta.is_file():
        raise GraloraConfigError(f"{meta}: the world model's weights are missing; reinstall gralora-diffusion or run scripts/pretrain_world.py.")
    pipe = build_world_pipeline(scaling_factor=json.loads(meta.read_text())["scaling_factor"])
    for name, file in COMPONENT_FILES.items():
        state = {k: v.float() for k, v in load_file(str(weights_dir / file)).items()}
        getattr(pipe, name).load_state_dict(state)
    for name in COMPONENT_FILES:
        getattr(pipe, name).eval()
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def save_world_sdxl(directory: str | Path) -> Path:
    """Write the world model with `save_pretrained`, so every `--pretrained_model_name_or_path` path works on it."""
    from ..outputs import claim_folder, mark_folder

    directory = claim_folder(directory, "make-tiny", "directory", write=False)  # the output rule: new, empty or ours
    tiny_world_pipeline().save_pretrained(directory)
    mark_folder(directory, "make-tiny")
    return directory
