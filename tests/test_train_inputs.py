"""Trainer settings and data: config files and flags, bad input caught before any model loads,
odd images converted or skipped, captions, buckets, batches per rank, the split prior loss."""

import argparse
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from gralora_diffusion.cli import main
from gralora_diffusion.train import TrainConfig, TrainConfigError, train
from gralora_diffusion.train import loop
from gralora_diffusion.train.config import add_arguments
from gralora_diffusion.train.data import DreamBoothDataset, EpochBatches, collate, scan_images
from gralora_diffusion.train.loss import diffusion_loss


def _image(path, size=(96, 80), color=(200, 40, 40), mode="RGB", **save):
    Image.new(mode, size, color).save(path, **save)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if anything tries to load the base model."""
    def refuse(cfg):
        raise AssertionError("the base model was loaded before the input was checked")
    monkeypatch.setattr(loop, "load_pipeline", refuse)


def _cfg(tmp_path, **kw):
    base = dict(pretrained_model_name_or_path="some/model", instance_data_dir=str(tmp_path / "data"),
                instance_prompt="a photo of sks teapot", output_dir=str(tmp_path / "out"), report_to="none")
    return TrainConfig(**{**base, **kw})


def test_flags_override_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('rank = 16\nlearning_rate = 0.001\ninstance_prompt = "from file"\n')
    (tmp_path / "c.yaml").write_text("rank: 8\nrandom_flip: true\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = TrainConfig.from_args(parser.parse_args(["--config", str(tmp_path / "c.toml"), "--rank", "32"]))
    assert (cfg.rank, cfg.learning_rate, cfg.instance_prompt) == (32, 0.001, "from file")
    cfg = TrainConfig.from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--no-random_flip"]))
    assert (cfg.rank, cfg.random_flip, cfg.train_batch_size) == (8, False, 4)


def test_unknown_setting_in_a_file_names_it(tmp_path):
    (tmp_path / "c.yaml").write_text("lerning_rate: 0.1\n")
    with pytest.raises(TrainConfigError, match="lerning_rate.*learning_rate"):
        TrainConfig.from_args(argparse.Namespace(config=str(tmp_path / "c.yaml")))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rank=6, gralora_k=4), "not divisible"),
        (dict(adapter="lora", hybrid_r=2), "hybrid_r"),
        (dict(with_prior_preservation=True), "class_data_dir"),
        (dict(resolution=100), "multiple of 8"),
        (dict(aspect_buckets="64x64"), "aspect_buckets"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(rank="8"), "expected int"),
        (dict(resume_from_checkpoint="checkpoint-9"), "not a complete checkpoint"),
    ],
)
def test_bad_settings_fail_before_any_model_loads(tmp_path, no_model_load, change, message):
    _image((tmp_path / "data").mkdir() or tmp_path / "data" / "a.png")
    with pytest.raises(TrainConfigError, match=message):
        train(_cfg(tmp_path, **change))


def test_missing_optimizer_package_says_how_to_install(tmp_path, no_model_load, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(TrainConfigError, match="pip install bitsandbytes"):
        train(_cfg(tmp_path, optimizer="adamw8bit"))


def test_bad_data_fails_before_any_model_loads(tmp_path, no_model_load):
    with pytest.raises(TrainConfigError, match="no such folder"):
        train(_cfg(tmp_path))
    (tmp_path / "data").mkdir()
    with pytest.raises(TrainConfigError, match="no image files"):
        train(_cfg(tmp_path))
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(TrainConfigError, match="none of the 1 image"):
        train(_cfg(tmp_path))
    _image(tmp_path / "data" / "ok.png")
    with pytest.raises(TrainConfigError, match="instance_prompt is missing"):
        train(_cfg(tmp_path, instance_prompt=None))


def test_cli_bad_input_is_one_line_with_exit_2(tmp_path, capsys):
    code = main(["train", "--pretrained_model_name_or_path", "x", "--instance_data_dir", str(tmp_path / "nope"),
                 "--instance_prompt", "p", "--report_to", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no such folder" in err[0]


def _exif_rotated(path):
    image = Image.new("RGB", (60, 40), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(path, exif=exif)


def test_odd_images_are_converted_and_broken_ones_skipped_with_one_warning_each(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    _image(data / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0))
    _image(data / "rgba.png", mode="RGBA", color=(255, 0, 0, 0))  # fully transparent -> white
    palette = Image.new("P", (50, 50), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(data / "palette.png", transparency=0)
    Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)).save(data / "deep.png")  # 16-bit white
    _exif_rotated(data / "rotated.jpg")
    _image(data / "tiny.png", size=(8, 8))
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    (data / "truncated.png").write_bytes(good.getvalue()[:60])
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8 garbage")
    with caplog.at_level(logging.WARNING, logger="gralora_diffusion.train"):
        records = scan_images(data, "a photo of sks teapot")
    names = {r.path.name: r for r in records}
    assert set(names) == {"cmyk.jpg", "rgba.png", "palette.png", "deep.png", "rotated.jpg", "tiny.png"}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("skipping" in w for w in warned)
    assert names["rotated.jpg"].size == (60, 40)  # (height, width) after EXIF rotation
    dataset = DreamBoothDataset(sorted(records, key=lambda r: r.path.name), resolution=32, center_crop=True)
    for i in range(len(dataset)):
        example = dataset[i]["instance"]
        assert example["pixel_values"].shape == (3, 32, 32)
        assert example["pixel_values"].min() >= -1 and example["pixel_values"].max() <= 1
    by_name = {r.path.name: dataset[i]["instance"] for i, r in enumerate(dataset.instances)}
    assert torch.allclose(by_name["rgba.png"]["pixel_values"], torch.ones(1))  # white
    assert torch.allclose(by_name["deep.png"]["pixel_values"], torch.ones(1))
    assert by_name["tiny.png"]["time_ids"].tolist() == [8, 8, 0, 0, 32, 32]  # original size, crop, target


def test_captions_from_txt_and_metadata(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / name)
    (tmp_path / "a.txt").write_text("caption a\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "caption b"}) + "\n")
    captions = {r.path.name: r.caption for r in scan_images(tmp_path, "fallback")}
    assert captions == {"a.png": "caption a", "b.png": "caption b", "c.png": "fallback"}


def test_crop_coordinates_and_flip_follow_the_image(tmp_path):
    _image(tmp_path / "wide.png", size=(128, 64))
    records = scan_images(tmp_path, "p")
    dataset = DreamBoothDataset(records, resolution=32, random_flip=True, seed=3)
    seen = set()
    for epoch in range(12):
        example = dataset[(epoch, 0)]["instance"]
        h, w, top, left, th, tw = example["time_ids"].tolist()
        assert (h, w, th, tw) == (64, 128, 32, 32) and top == 0 and 0 <= left <= 32
        seen.add(example["key"][-1])
        assert torch.equal(example["pixel_values"], dataset[(epoch, 0)]["instance"]["pixel_values"])  # same item, same pixels
    assert seen == {True, False}


def test_buckets_group_batches_and_ranks_share_the_epoch(tmp_path):
    for i in range(5):
        _image(tmp_path / f"wide{i}.png", size=(128, 64))
    for i in range(3):
        _image(tmp_path / f"tall{i}.png", size=(64, 128))
    cfg = _cfg(tmp_path, resolution=64, aspect_buckets="auto")
    dataset = DreamBoothDataset(scan_images(tmp_path, "p"), resolution=64, buckets=cfg.bucket_list())
    ranks = [EpochBatches(dataset, 2, seed=0, num_replicas=2, rank=r) for r in range(2)]
    per_rank = [b.for_epoch(1) for b in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])
    seen = set()
    for batch in per_rank[0] + per_rank[1]:
        assert len({dataset.target_size(i) for _, i in batch}) == 1  # one bucket per batch
        seen.update(i for _, i in batch)
        assert collate([dataset[item] for item in batch])["pixel_values"].ndim == 4
    assert seen == set(range(8))
    assert dataset.target_size(0) != dataset.target_size(7)  # tall and wide differ
    assert per_rank[0] == ranks[0].for_epoch(1) and per_rank[0] != ranks[0].for_epoch(2)


def test_prior_loss_uses_both_halves():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    target = torch.zeros(4, 4, 8, 8)
    pred = torch.cat([torch.full((2, 4, 8, 8), 1.0), torch.full((2, 4, 8, 8), 2.0)])
    timesteps = torch.tensor([10, 500, 10, 500])
    loss, parts = diffusion_loss(pred, target, timesteps, scheduler, with_prior=True, prior_loss_weight=0.5)
    assert parts["instance_loss"].item() == 1.0 and parts["prior_loss"].item() == 4.0
    assert loss.item() == pytest.approx(1.0 + 0.5 * 4.0)
    weighted, _ = diffusion_loss(pred, target, timesteps, scheduler, snr_gamma=5.0, with_prior=True)
    assert torch.isfinite(weighted) and weighted.item() != loss.item()


def test_latents_mean_and_std_are_honoured_both_ways():
    from types import SimpleNamespace

    from gralora_diffusion.bases.vae import scale as normalize
    from gralora_diffusion.train.sampling import latent_stats

    def normalize_latents(latents, config):
        return normalize(SimpleNamespace(vae=SimpleNamespace(config=config)), latents)

    config = SimpleNamespace(scaling_factor=0.5, latents_mean=[1.0, 2.0], latents_std=[2.0, 4.0])
    latents = torch.randn(3, 2, 4, 4)
    normalized = normalize_latents(latents, config)
    assert torch.allclose(normalized[:, 1], (latents[:, 1] - 2.0) * 0.5 / 4.0)
    mean, std = latent_stats(config, normalized)
    assert torch.allclose(normalized * std / 0.5 + mean, latents, atol=1e-6)  # what sampling does before decoding
    assert torch.equal(normalize_latents(latents, SimpleNamespace(scaling_factor=0.5)), latents * 0.5)
