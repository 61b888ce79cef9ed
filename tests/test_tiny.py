import numpy as np
import torch
import torch.nn as nn
from diffusers import StableDiffusionXLPipeline

import gralora_diffusion as gd
from conftest import generate


def test_tiny_pipeline_is_real_sdxl_and_deterministic():
    a, b, c = gd.tiny_sdxl_pipeline(seed=0), gd.tiny_sdxl_pipeline(seed=0), gd.tiny_sdxl_pipeline(seed=1)
    assert isinstance(a, StableDiffusionXLPipeline)
    assert a.unet.config.addition_embed_type == "text_time"
    assert a.vae_scale_factor == 8
    img_a, img_b, img_c = generate(a), generate(b), generate(c)
    assert img_a.shape == (1, 64, 64, 3)
    assert np.array_equal(img_a, img_b)
    assert np.abs(img_a - img_c).max() > 1e-3


def test_every_linear_width_divisible_by_8(tiny_pipe):
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, m in getattr(tiny_pipe, component).named_modules():
            if isinstance(m, nn.Linear) and "add_embedding.linear_1" not in name:
                assert m.in_features % 8 == 0 and m.out_features % 8 == 0, (component, name)


def test_building_does_not_move_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    gd.tiny_sdxl_pipeline(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_saved_tiny_pipeline_loads_with_from_pretrained(tmp_path):
    gd.save_tiny_sdxl(tmp_path / "tiny")
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "tiny")
    loaded.set_progress_bar_config(disable=True)
    assert np.allclose(generate(loaded), generate(gd.tiny_sdxl_pipeline(seed=0)), atol=1e-6)
