"""Tiny random DINO (ViT or DINOv2) and CLIP models, built offline and saved as transformers
`save_pretrained` folders, so `evaluate` runs every metric code path with no download (as
`tiny_sdxl_pipeline` does for SDXL). Random weights: their numbers mean nothing, their code paths
are the real ones (the same `from_pretrained` loading, processors and features)."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32
PATCH_SIZE = 8
HIDDEN = 32
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINO's normalisation
CLIP_MEAN, CLIP_STD = [0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]  # CLIP's


def _vit_settings() -> dict:
    return dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=2 * HIDDEN)


def _tiny_dino(seed: int, kind: str):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "vit":
            model = ViTModel(ViTConfig(**_vit_settings()), add_pooling_layer=False)
            processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                          image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        elif kind == "dinov2":
            model = Dinov2Model(Dinov2Config(**_vit_settings()))
            processor = BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                          do_center_crop=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        else:
            raise ValueError(f"kind={kind!r}: 'vit' or 'dinov2'.")
    return model, processor


def _tiny_clip(seed: int):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .tiny import MAX_LENGTH, build_tokenizer

    tokenizer = build_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=_vit_settings(), projection_dim=16))
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _save(folder, build) -> Path:
    from .quiet import quiet_libraries

    # quiet: transformers warns that image processors fall back to PIL without torchvision, and shows shard bars
    with quiet_libraries():
        model, processor = build()
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return Path(folder)


def save_tiny_dino(folder: str | Path, seed: int = 0, kind: str = "vit") -> Path:
    """A random DINO-style ViT (`kind="vit"`, as facebook/dino-vits16) or DINOv2 (`"dinov2"`) with its
    image processor, saved to `folder`; `DinoEmbedder(folder)` loads it."""
    return _save(folder, lambda: _tiny_dino(seed, kind))


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A random CLIP (vision and text towers, projections) with the tiny pipeline's character-level
    tokenizer and a CLIP image processor, saved to `folder`; `ClipEmbedder(folder)` loads it."""
    return _save(folder, lambda: _tiny_clip(seed))


def save_tiny_scorers(folder: str | Path, seed: int = 0, dino_kind: str = "vit") -> tuple[Path, Path]:
    """Both, in `folder/dino` and `folder/clip`: pass them as `dino_model=` and `clip_model=`."""
    folder = Path(folder)
    return save_tiny_dino(folder / "dino", seed, dino_kind), save_tiny_clip(folder / "clip", seed)
