import numpy as np
import pytest
import torch
from conftest import PROMPT, randomize_gralora_B
from PIL import Image

import gralora_diffusion as gd
from gralora_diffusion.adapter_file import collect_adapter, read_adapter_file, save_adapter_file
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.generate import HEADER_HEIGHT, LABEL_WIDTH, generate_samples, parse_adapter, parse_scales
from gralora_diffusion.tiny import TINY_MODEL_ID

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

OTHER_PROMPT = "a red cube on a table"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    gd.add_gralora(pipe, r=4, gralora_k=2, hybrid_r=2, text_encoder_targets="attn")
    for component in ("unet", "text_encoder", "text_encoder_2"):
        randomize_gralora_B(getattr(pipe, component), std=0.3)
    state_dicts, configs = collect_adapter({c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")})
    return save_adapter_file(tmp_path_factory.mktemp("gen") / "adapter.safetensors", state_dicts, configs, base_model=TINY_MODEL_ID)


@pytest.fixture(scope="module")
def sweep(adapter, tmp_path_factory):
    return generate_samples("tiny", adapters=[(str(adapter), 0.8)], prompts=[PROMPT, OTHER_PROMPT], seeds=[0],
                            steps=2, scales=[0, 1], output_dir=tmp_path_factory.mktemp("sweep"))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_images_and_labelled_grid(sweep):
    assert [p.name for p in sweep.images] == [
        "00_a-photo-of-sks-teapot_seed0_scale0.png", "00_a-photo-of-sks-teapot_seed0_scale1.png",
        "01_a-red-cube-on-a-table_seed0_scale0.png", "01_a-red-cube-on-a-table_seed0_scale1.png"]
    assert all(Image.open(p).size == (64, 64) for p in sweep.images)
    grid = Image.open(sweep.grid).convert("RGB")
    assert grid.size == (LABEL_WIDTH + 2 * 64, HEADER_HEIGHT + 2 * 64)
    cell = np.asarray(grid.crop((LABEL_WIDTH + 64, HEADER_HEIGHT + 64, LABEL_WIDTH + 128, HEADER_HEIGHT + 128))).astype(int)
    assert (cell == pixels(sweep.images[3])).all()  # row 2 (second prompt), column 2 (scale 1)
    assert np.asarray(grid.crop((0, 0, LABEL_WIDTH, HEADER_HEIGHT + 128))).min() < 128  # labels drawn


def test_scale_zero_column_equals_base_pipeline(sweep):
    base = gd.tiny_sdxl_pipeline(seed=0)
    for row, prompt in enumerate([PROMPT, OTHER_PROMPT]):
        image = base(prompt, num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert (np.asarray(image).astype(int) == pixels(sweep.images[2 * row])).all()
        assert np.abs(pixels(sweep.images[2 * row + 1]) - pixels(sweep.images[2 * row])).max() > 20  # the adapter acts


def test_cli_fuse_with_prompts_file_matches_unfused(adapter, sweep, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# my prompts\n\n{PROMPT}\n")
    out = tmp_path / "fused"
    assert cli_main(["generate", "--base", "tiny", "--adapter", f"{adapter}:0.8", "--prompts-file", str(prompts),
                     "--steps", "2", "--scales", "0,1", "--fuse", "--output-dir", str(out)]) == 0
    assert f"Grid (rows: prompt x seed, columns: scale 0, 1): {out / 'grid.png'}" in capsys.readouterr().out
    for name in ("00_a-photo-of-sks-teapot_seed0_scale0.png", "00_a-photo-of-sks-teapot_seed0_scale1.png"):
        assert np.abs(pixels(out / name) - pixels(sweep.output_dir / name)).max() <= 2  # fused == unfused up to rounding


def test_adapter_for_another_base_model_gives_the_loaders_error(adapter, tmp_path, capsys):
    other = read_adapter_file(adapter)  # same shapes, but modules tiny's UNet does not have (SDXL has down_blocks.2)
    moved = {k.replace("down_blocks.1.", "down_blocks.2."): v for k, v in other.state_dicts["unet"].items()}
    path = save_adapter_file(tmp_path / "other.safetensors", {"unet": moved}, {"unet": other.configs["unet"]},
                             base_model="stabilityai/stable-diffusion-xl-base-1.0")
    out = tmp_path / "out"
    assert cli_main(["generate", "--adapter", str(path), "--prompt", PROMPT, "--steps", "1", "--output-dir", str(out)]) == 2
    assert "down_blocks.2" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_argument_parsing():
    assert parse_adapter("out/a.safetensors:0.5") == ("out/a.safetensors", 0.5)
    assert parse_adapter("me/repo") == ("me/repo", 1.0)
    assert parse_adapter("dir:with:colons") == ("dir:with:colons", 1.0)
    assert parse_scales("0, 0.5,1.0") == [0.0, 0.5, 1.0]
    with pytest.raises(gd.GraloraError, match="separated by commas"):
        parse_scales("0;1")
