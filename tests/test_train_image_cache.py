"""The in-memory image cache (train/image_cache.py): decoded once per image instead of at every step,
with the very same items, loss sequence and adapter as decoding every time."""

import pytest
import torch
from conftest import PROMPT, SAMPLES

import gralora_diffusion as gd
from gralora_diffusion.tiny import TINY_MODEL_ID
from gralora_diffusion.train import TrainConfig, data, train
from gralora_diffusion.train.data import DreamBoothDataset, scan_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def decodes(monkeypatch):
    """Counts real decodes: `data.load_image` wrapped, calling through."""
    calls = []
    real = data.load_image

    def counted(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(data, "load_image", counted)
    return calls


def test_cached_items_equal_decoded_items_and_the_budget_holds(decodes):
    records = scan_images(SAMPLES, PROMPT)
    kwargs = dict(resolution=48, random_flip=True, repeats=2, seed=3, buckets=[(48, 48), (32, 64), (64, 32)])
    plain, cached = DreamBoothDataset(records, **kwargs), DreamBoothDataset(records, **kwargs, image_cache_mb=1)
    items = [(epoch, i) for epoch in range(3) for i in range(len(plain))]
    for item in items:
        a, b = plain[item]["instance"], cached[item]["instance"]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["time_ids"], b["time_ids"])
        assert a["key"] == b["key"]
    assert len(decodes) == len(items) + len(records)  # the plain dataset every time, the cached one once per image
    assert len(cached.cache) == len(records) and 0 < cached.cache.used <= 2**20
    tight = DreamBoothDataset(records, **kwargs, image_cache_mb=0)
    tight[0, 0]
    assert len(tight.cache) == 0 and tight.cache.used == 0


@pytest.mark.parametrize("cache_latents", [False, True])
def test_loss_sequence_is_identical_with_and_without_the_image_cache(tmp_path, decodes, cache_latents):
    results, counts = {}, {}
    for budget in (0, 64):
        before = len(decodes)
        cfg = TrainConfig(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                          output_dir=str(tmp_path / f"mb{budget}"), resolution=64, train_batch_size=1, max_train_steps=12,
                          learning_rate=1e-3, rank=8, seed=0, report_to="none", checkpointing_steps=1000, random_flip=True,
                          cache_latents=cache_latents, image_cache_mb=budget)
        results[budget] = train(cfg, pipeline=gd.tiny_sdxl_pipeline(seed=0))
        counts[budget] = len(decodes) - before
    assert counts == {0: 12, 64: 5}  # 12 steps over the 5 sample images
    assert results[0].losses == results[64].losses  # bit for bit
    plain, cached = (results[b].components["unet"].state_dict() for b in (0, 64))
    assert all(torch.equal(plain[k], cached[k]) for k in plain)
