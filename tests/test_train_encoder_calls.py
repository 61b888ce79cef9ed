"""--cache_latents: once every (image, crop, flip) has been seen, a step runs the VAE encoder 0 times;
without the cache every micro-batch is encoded. The count wraps the real `vae.encode` and calls through."""

import pytest
import torch
from conftest import PROMPT, SAMPLES

import gralora_diffusion as gd
from gralora_diffusion.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = len([p for p in SAMPLES.iterdir() if p.suffix == ".png"])


def encoder_calls_per_step(tmp_path, cache_latents: bool) -> tuple[list[int], list[float]]:
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    calls = []
    real = pipe.vae.encode

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    pipe.vae.encode = counting
    per_step, seen = [], [0]

    def on_step(step, loss):
        per_step.append(len(calls) - seen[0])
        seen[0] = len(calls)

    # center_crop and no flip: each image has one augmented form, so the cache can fill up
    cfg = TrainConfig(pretrained_model_name_or_path="tiny", instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(tmp_path / f"cache-{cache_latents}"), resolution=64, center_crop=True,
                      random_flip=False, train_batch_size=1, max_train_steps=3 * IMAGES, learning_rate=1e-3, rank=4,
                      seed=0, report_to="none", checkpointing_steps=1000, cache_latents=cache_latents)
    result = train(cfg, pipeline=pipe, on_step=on_step)
    assert len(calls) == sum(per_step) and set(calls) == {1}  # every call belongs to a step, one image each
    return per_step, result.losses


def test_cached_latents_run_the_encoder_only_in_the_first_epoch(tmp_path):
    cached, cached_losses = encoder_calls_per_step(tmp_path, cache_latents=True)
    plain, plain_losses = encoder_calls_per_step(tmp_path, cache_latents=False)
    print(f"VAE encoder calls per step, cached: {cached}; uncached: {plain}")
    assert len(cached) == len(plain) == 3 * IMAGES
    assert plain == [1] * (3 * IMAGES)  # one per batch, every step
    assert cached[:IMAGES] == [1] * IMAGES  # epoch 1: each image is new once (batch size 1)
    assert cached[IMAGES:] == [0] * (2 * IMAGES)  # every later step: 0 encoder calls
    assert torch.allclose(torch.tensor(cached_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-6)
