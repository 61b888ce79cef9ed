"""Prior preservation trains on every class image (an epoch covers max(instances x repeats, class
images), as diffusers' DreamBooth dataset), generates only the class images a run can reach and says
how many, and a run killed and resumed still equals an uninterrupted one."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPT, SAMPLES
from PIL import Image

import gralora_diffusion as gd
from gralora_diffusion.tiny import TINY_MODEL_ID
from gralora_diffusion.train import TrainConfig, loop, train
from gralora_diffusion.train.data import DreamBoothDataset, EpochBatches, collate, scan_images

pytestmark = pytest.mark.usefixtures("one_thread")


def photos(folder: Path, count: int, size: int = 64) -> Path:
    """`count` distinct small PNGs (plain colours), real files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = np.array([(37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256], dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (size, size, 3)).copy()).save(folder / f"class-{i:05d}.png")
    return folder


def two_photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(SAMPLES.glob("*.png"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def run(tmp_path, name, on_step=None, **kw):
    settings = dict(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(two_photos(tmp_path / name)),
                    instance_prompt=PROMPT, output_dir=str(tmp_path / name / "out"), resolution=64, train_batch_size=1,
                    max_train_steps=8, learning_rate=1e-3, rank=4, seed=0, report_to="none", checkpointing_steps=1000,
                    with_prior_preservation=True, class_data_dir=str(tmp_path / "class"), class_prompt="a photo of a teapot",
                    num_class_images=8, num_inference_steps=1, sample_batch_size=4)
    return train(TrainConfig(**{**settings, **kw}), pipeline=gd.tiny_sdxl_pipeline(seed=0), on_step=on_step)


def class_paths_seen(monkeypatch) -> list:
    """The class images of every micro-batch that reaches the loss, in order."""
    seen = []
    real = loop.accumulate

    def spy(run, batch, group_size, is_update):
        assert batch["with_prior"]
        half = len(batch["keys"]) // 2
        seen.extend(Path(key[0]).name for key in batch["keys"][half:])
        return real(run, batch, group_size, is_update)

    monkeypatch.setattr(loop, "accumulate", spy)
    return seen


def test_two_photos_eight_class_images_eight_steps_train_on_every_class_image(tmp_path, monkeypatch, capsys):
    photos(tmp_path / "class", 8)
    seen = class_paths_seen(monkeypatch)
    run(tmp_path, "a")
    assert len(set(seen)) >= 6  # the floor; it was 2 (only the first len(photos) were ever used)
    assert Counter(seen) == {f"class-{i:05d}.png": 1 for i in range(8)}  # 8 steps at batch 1 = one epoch of 8
    assert "Prior preservation: training on 8 class image(s)" in capsys.readouterr().out


@pytest.mark.parametrize("instances, repeats, classes, batch", [(2, 1, 8, 1), (2, 1, 8, 3), (5, 1, 16, 2), (3, 4, 5, 2)])
def test_an_epoch_shows_the_prior_loss_each_class_image_once(tmp_path, instances, repeats, classes, batch):
    inst = scan_images(photos(tmp_path / "inst", instances), "a photo of sks teapot")
    cls = scan_images(photos(tmp_path / "cls", classes), "a photo of a teapot")
    dataset = DreamBoothDataset(inst, 64, repeats=repeats, seed=0, classes=cls, image_cache_mb=0)
    assert len(dataset) == max(instances * repeats, classes)
    batches = EpochBatches(dataset, batch, seed=0)
    for epoch in (0, 1):
        seen_classes, seen_instances = Counter(), Counter()
        for indices in batches.for_epoch(epoch):
            parts = collate([dataset[i] for i in indices])
            half = len(parts["keys"]) // 2
            seen_instances.update(Path(k[0]).name for k in parts["keys"][:half])
            seen_classes.update(Path(k[0]).name for k in parts["keys"][half:])
        assert set(seen_classes) == {p.path.name for p in cls}
        if classes >= instances * repeats:  # every class image exactly once, every photo at least `repeats` times
            assert set(seen_classes.values()) == {1} and min(seen_instances.values()) >= repeats
        else:  # fewer class images than items: each one ⌈items/classes⌉ or ⌊items/classes⌋ times
            assert set(seen_classes.values()) <= {len(dataset) // classes, -(-len(dataset) // classes)}
        assert set(seen_instances) == {p.path.name for p in inst}


def test_only_the_class_images_a_run_reaches_are_generated_and_the_count_is_said(tmp_path, capsys):
    run(tmp_path, "a", max_train_steps=3, num_class_images=100)
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == [f"class-{i:05d}.png" for i in range(3)]
    out = capsys.readouterr().out
    assert "Generating 3 class image(s)" in out
    assert "training on 3 class image(s)" in out and "of --num_class_images 100: 3 update(s) reach no more" in out


class Killed(Exception):
    pass


def test_a_killed_and_resumed_prior_run_equals_an_uninterrupted_one(tmp_path):
    photos(tmp_path / "class", 5)  # more class images than photos: the epoch is 5 items long
    settings = dict(max_train_steps=7, checkpointing_steps=2, random_flip=True, num_class_images=5)
    whole = run(tmp_path, "whole", **settings)

    def kill_at_5(step, loss):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path, "parts", on_step=kill_at_5, **settings)
    resumed = run(tmp_path, "parts", resume_from_checkpoint="latest", **settings)
    assert resumed.global_step == 7 and resumed.losses == pytest.approx(whole.losses[4:], rel=1e-6)
    a = {k: v for k, v in whole.components["unet"].state_dict().items() if "lora" in k or "gralora" in k}
    b = {k: v for k, v in resumed.components["unet"].state_dict().items() if "lora" in k or "gralora" in k}
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_the_checkpoints_class_image_count(tmp_path, capsys):
    """Resumed with more steps, the run keeps training on the class images it started with (its
    epochs stay the same), though fresh it would have generated more."""
    run(tmp_path, "a", max_train_steps=2, checkpointing_steps=2, num_class_images=100)
    assert len(list((tmp_path / "class").iterdir())) == 2
    capsys.readouterr()
    result = run(tmp_path, "a", max_train_steps=4, checkpointing_steps=2, num_class_images=100, resume_from_checkpoint="latest")
    assert result.global_step == 4 and len(list((tmp_path / "class").iterdir())) == 2
    assert "training on 2 class image(s)" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prior_generation_precision(tmp_path, precision, monkeypatch):
    """Class images drawn in the asked dtype; the frozen base goes back to the training dtype after."""
    seen = []
    real = loop.generate_images

    def spy(pipe, *args, **kwargs):
        autocast = args[-1]
        with autocast():
            seen.append((pipe.unet.dtype, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(loop, "generate_images", spy)
    result = run(tmp_path, "a", max_train_steps=1, num_class_images=1, mixed_precision="bf16", prior_generation_precision=precision)
    assert seen == ([(torch.float32, None)] if precision == "fp32" else [(torch.bfloat16, torch.bfloat16)])
    assert result.pipeline.unet.dtype == torch.bfloat16 and len(list((tmp_path / "class").iterdir())) == 1
