"""generate --scheduler NAME and --init_image (image-to-image), on the tiny SDXL."""

import numpy as np
import pytest
from conftest import SAMPLES
from PIL import Image

import gralora_diffusion as gd
from gralora_diffusion.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_scheduler_by_name_changes_the_images(tmp_path):
    kwargs = dict(prompts=["a photo of a red ball"], steps=2, progress=False)
    pipe = gd.tiny_world_pipeline()
    plain = gd.generate_samples("world", output_dir=tmp_path / "a", **kwargs)
    euler = gd.generate_samples(pipe=pipe, output_dir=tmp_path / "b", scheduler="EulerAncestralDiscreteScheduler", **kwargs)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert np.abs(_image(plain.images[0]) - _image(euler.images[0])).max() > 0


def test_bad_scheduler_is_one_line_before_loading(tmp_path, capsys):
    assert cli_main(["generate", "--prompt", "x", "--scheduler", "EulerDiscreteSchedular", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Did you mean EulerDiscreteScheduler" in err[0] and "--scheduler" in err[0]
    assert not (tmp_path / "o").exists()


def test_init_image_starts_from_the_picture(tmp_path, capsys):
    picture = SAMPLES / "teapot_0.png"
    args = ["generate", "--base", "world", "--prompt", "a photo of sks teapot", "--steps", "4", "--init_image", str(picture)]
    assert cli_main(args + ["--strength", "0.25", "--output_dir", str(tmp_path / "low")]) == 0
    assert cli_main(args + ["--strength", "1.0", "--output_dir", str(tmp_path / "high")]) == 0
    target = _image(picture) if Image.open(picture).size == (64, 64) else np.asarray(Image.open(picture).convert("RGB").resize((64, 64))).astype(int)
    low = np.abs(_image(next((tmp_path / "low").glob("00_*.png"))) - target).mean()
    high = np.abs(_image(next((tmp_path / "high").glob("00_*.png"))) - target).mean()
    assert low < high  # little noise keeps the picture; full strength draws anew
    assert cli_main(args + ["--strength", "0", "--output_dir", str(tmp_path / "zero")]) == 2
    assert "--strength 0.0" in capsys.readouterr().err and not (tmp_path / "zero").exists()
