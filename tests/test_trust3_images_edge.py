"""Issue 18 (trust, round 3) items 4-6: one image reader for training, class images and evaluation
(EXIF, 16-bit, alpha on white, pixel and shape limits before decoding), one error edge in the CLI
(OSError with its path, MemoryError, named library errors: one line, exit 2; anything else a
traceback), the train lock never left behind."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from gralora_diffusion.cli import main
from gralora_diffusion.errors import ImageFileError, OutputError
from gralora_diffusion.evaluate import read_instance_images
from gralora_diffusion.images import MAX_PIXELS, image_size, read_image
from gralora_diffusion.train import TrainConfig, train
from gralora_diffusion.train.data import DreamBoothDataset, load_image, scan_images

from conftest import PROMPT, SAMPLES
from test_cli_errors import fails as one_line_exit_2  # exit 2, one line, no traceback

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def hard_photos(tmp_path_factory):
    """The kinds of file the three readers used to see differently: EXIF-rotated, 16-bit, RGBA, palette
    with transparency, 16-bit gray; each with a known right answer."""
    folder = tmp_path_factory.mktemp("hard")
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: shown 20 wide, 40 high
    rotated.save(folder / "a_rotated.jpg", exif=exif)
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(folder / "b_gray16.png")  # mid gray, not white
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black: white on the trainer
    rgba.save(folder / "c_rgba.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(folder / "d_palette.png", transparency=0)
    return folder


def test_training_and_evaluation_read_the_same_pixels(hard_photos):
    paths = sorted(hard_photos.iterdir())
    evaluated = read_instance_images(hard_photos)
    trained = [load_image(p) for p in paths]
    for path, a, b in zip(paths, evaluated, trained):
        assert a.mode == b.mode == "RGB" and a.size == b.size, path
        assert (np.asarray(a) == np.asarray(b)).all(), path
    rotated, gray16, rgba, palette = (np.asarray(i) for i in evaluated)
    assert rotated.shape[:2] == (40, 20) and image_size(paths[0]) == (40, 20)
    assert abs(int(gray16[0, 0, 0]) - 128) <= 1  # 16-bit scaled, not clipped to white
    assert (rgba == 255).all() and (palette == 255).all()  # transparency on white, as the trainer always did


def test_the_pixel_limit_is_checked_before_decoding(tmp_path, capsys):
    side = int(MAX_PIXELS**0.5) + 1
    Image.new("1", (side, side)).save(tmp_path / "big.png")  # 1-bit: small on disk and in memory
    with pytest.raises(ImageFileError, match=f"{side}x{side} pixels is more than the {MAX_PIXELS:,}"):
        read_image(tmp_path / "big.png")
    with pytest.raises(ImageFileError, match="big.png"):
        image_size(tmp_path / "big.png")
    line = one_line_exit_2(capsys, ["evaluate", "--instance_data_dir", str(tmp_path), "--dino_model", "none",
                                    "--clip_model", "none", "--output_dir", str(tmp_path / "eval")])
    assert "big.png" in line and "pixels" in line


def test_a_decompression_bomb_is_one_line(tmp_path, capsys):
    Image.new("1", (10000, 10000)).save(tmp_path / "bomb.png")  # 100 Mpx: above Pillow's bomb warning
    with pytest.raises(ImageFileError, match="bomb.png"):
        read_image(tmp_path / "bomb.png")
    line = one_line_exit_2(capsys, ["evaluate", "--instance_data_dir", str(tmp_path), "--dino_model", "none",
                                    "--clip_model", "none", "--output_dir", str(tmp_path / "eval")])
    assert "bomb.png" in line


@pytest.mark.parametrize("size", [(1, 2_000_000), (2000, 1), (17, 1)])
def test_a_strip_is_refused_before_it_is_upscaled(tmp_path, caplog, size):
    """A 1 x 2,000,000 image is only 2 Mpx but would be upscaled to cover the training square."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("L", size).save(photos / "strip.png")
    Image.new("RGB", (64, 64)).save(photos / "ok.png")
    with caplog.at_level(logging.WARNING, logger="gralora_diffusion.train"):
        records = scan_images(photos, PROMPT)
    assert [r.path.name for r in records] == ["ok.png"] and "narrower than 1:16" in caplog.text
    with pytest.raises(ImageFileError, match="strip.png"):
        read_image(photos / "strip.png")


def test_the_trainer_decodes_through_the_reader(hard_photos):
    records = scan_images(hard_photos, PROMPT)
    dataset = DreamBoothDataset(records, 16, center_crop=True)
    for record in records:
        pixels, original = dataset.decode(record, (16, 16))
        assert original == record.size  # the header's size is the decoded size: EXIF applied in both


# -- 5: one error edge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    lambda long: ["generate", "--prompt", PROMPT, "--output-dir", long],
    lambda long: ["make-tiny", long],
    lambda long: ["evaluate", "--instance_data_dir", str(SAMPLES), "--output_dir", long, "--dino_model", "none", "--clip_model", "none"],
    lambda long: ["evaluate", "--instance_data_dir", str(SAMPLES), "--json", f"{long}/r.json", "--dino_model", "none", "--clip_model", "none"],
    lambda long: ["train", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(SAMPLES),
                  "--instance_prompt", PROMPT, "--output_dir", long, "--report_to", "none"],
])
def test_a_file_name_too_long_is_one_line_with_the_path(tmp_path, capsys, argv):
    long = str(tmp_path / ("x" * 300))
    line = one_line_exit_2(capsys, argv(long))
    assert "File name too long" in line and "x" * 50 in line


def test_memory_and_named_library_errors_are_one_line_and_others_keep_their_traceback(monkeypatch, capsys, tmp_path):
    import gralora_diffusion.commands.info as info_command
    from safetensors import SafetensorError

    for error, words in ((MemoryError(), "out of memory"), (SafetensorError("header too large"), "header too large"),
                         (Image.DecompressionBombError("too many pixels"), "too many pixels"),
                         (OSError(28, "No space left on device", str(tmp_path / "f")), f"{tmp_path / 'f'}: No space left")):
        def boom(args, error=error):
            raise error
        monkeypatch.setattr(info_command, "run", boom)
        assert words in one_line_exit_2(capsys, ["info", "anything"])

    def bug(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(info_command, "run", bug)
    with pytest.raises(ZeroDivisionError):
        main(["info", "anything"])


def test_the_lock_is_never_left_behind(tmp_path, monkeypatch):
    import os

    from gralora_diffusion.train.lock import LOCK_NAME, output_dir_lock

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, *a, **k):
            self.f = real_fdopen(fd, *a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(OutputError, match="disk is full"):
        with output_dir_lock(tmp_path / "out"):
            pass
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    monkeypatch.undo()
    # a start that fails after the lock is taken (a base model folder that cannot load) removes it too
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["nope", "X"]}))
    cfg = TrainConfig(pretrained_model_name_or_path=str(broken), instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                         output_dir=str(tmp_path / "run"), report_to="none", max_train_steps=1, resolution=64)
    with pytest.raises(Exception):
        train(cfg)
    assert not (tmp_path / "run" / LOCK_NAME).exists()
