import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import gralora_diffusion as gd

PROMPT = "a photo of sks teapot"


@pytest.fixture
def tiny_pipe():
    return gd.tiny_sdxl_pipeline(seed=0)


def generate(pipe, prompt=PROMPT, seed=0, steps=2, **kwargs):
    """A 64x64 image as a float numpy array, deterministic for the seed."""
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images


def randomize_gralora_B(model, adapter_name=None, std=0.1, seed=1):
    """Adapters start as a no-op (B = 0); give B (and the hybrid B) random values so they act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("gralora_B" in name) and (adapter_name is None or f".{adapter_name}" in name):
                p.copy_(torch.randn(p.shape, generator=g) * std)
