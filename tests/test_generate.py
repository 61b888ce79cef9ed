from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPT, randomize_gralora_B
from PIL import Image

import gralora_diffusion as gd
from gralora_diffusion.adapter_file import collect_adapter, read_adapter_file, save_adapter_file
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.generate import generate_samples, parse_adapter, parse_scales, scale_labels
from gralora_diffusion.grids import HEADER_HEIGHT, LABEL_WIDTH
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
    assert f"Grid (rows: prompt x seed, columns: scale 0, scale 1): {out / 'grid.png'}" in capsys.readouterr().out
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
    assert scale_labels([0, 0.5, 1.0]) == ["0", "0.5", "1"]
    assert scale_labels([0.5, 0.5000001, 1]) == ["0.5", "0.5000001", "1"]
    assert len(set(scale_labels([1.0, 1.0 + 2 ** -52]))) == 2
    with pytest.raises(gd.GraloraError, match="separated by commas"):
        parse_scales("0;1")


# -- plain LoRA adapters, progress, the output folder, unique names (issues 13 and 10) -------------------------------


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    """A LoRA saved as the trainer's `--adapter lora` saves it (diffusers' save_lora_weights, PEFT's keys)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = gd.tiny_sdxl_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    folder = tmp_path_factory.mktemp("peft-lora")
    StableDiffusionXLPipeline.save_lora_weights(
        folder, safe_serialization=True, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    return folder


def test_lora_exports_give_the_gralora_images(adapter, sweep, tmp_path, capsys):
    """A GraLoRA adapter and its exact LoRA exports, diffusers keys unfused and kohya keys fused, make the
    same grid through `generate` (no custom Python); the bar counts the images, the libraries' bars stay off."""
    gd.export_lora(adapter, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    gd.export_lora(adapter, tmp_path / "kohya.safetensors", format="kohya")
    for source, extra in ((tmp_path / "lora", []), (tmp_path / "kohya.safetensors", ["--fuse"])):
        out = tmp_path / f"out-{source.stem}"
        assert cli_main(["generate", "--adapter", f"{source}:0.8", "--prompt", PROMPT, "--steps", "2", "--scales", "0,1",
                         "--output-dir", str(out), *extra]) == 0
        captured = capsys.readouterr()
        assert "Loading base model tiny ..." in captured.out
        assert "generate: 100%" in captured.err and "2/2" in captured.err, captured.err
        assert "Loading" not in captured.err and "Fetching" not in captured.err
        for name in ("00_a-photo-of-sks-teapot_seed0_scale0.png", "00_a-photo-of-sks-teapot_seed0_scale1.png"):
            assert np.abs(pixels(out / name) - pixels(sweep.output_dir / name)).max() <= 2, (source, name)


def test_trainers_lora_file_beside_a_gralora_adapter(adapter, peft_lora, sweep, tmp_path):
    """The trainer's LoRA baseline file (diffusers' save_lora_weights) and a GraLoRA adapter in one run:
    scale 0 is still the base model, scale 1 has both adapters acting."""
    result = generate_samples("tiny", adapters=[(str(adapter), 0.8), (str(peft_lora), 1.0)], prompts=[PROMPT], steps=2,
                              scales=[0, 1], output_dir=tmp_path / "both", progress=False)
    assert (pixels(result.images[0]) == pixels(sweep.images[0])).all()
    assert np.abs(pixels(result.images[1]) - pixels(sweep.images[1])).max() > 20  # GraLoRA alone differs: the LoRA acts


def test_default_folder_is_new_and_a_training_set_is_refused(tmp_path, capsys):
    from gralora_diffusion.cli import build_parser
    from gralora_diffusion.generate import MARKER, check_output_dir
    from conftest import SAMPLES

    assert build_parser().parse_args(["generate", "--prompt", PROMPT]).output_dir.name == "generated"
    with pytest.raises(gd.GraloraError, match="generate did not write"):
        check_output_dir(SAMPLES)  # the repository's training images
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "dog.jpg")
    (photos / "dog.txt").write_text("a photo of sks dog")
    before = sorted(p.name for p in photos.iterdir())
    assert cli_main(["generate", "--prompt", PROMPT, "--steps", "1", "--output-dir", str(photos)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(photos) in lines[0] and "dog" in lines[0] and "new or empty folder" in lines[0]
    assert "Loading base model" not in captured.out  # refused before anything loads
    assert sorted(p.name for p in photos.iterdir()) == before
    (photos / MARKER).write_text("")  # a marker does not make someone else's images ours
    with pytest.raises(gd.GraloraError, match="dog.jpg"):
        check_output_dir(photos)
    (photos / "dog.jpg").unlink()
    (photos / "dog.txt").unlink()
    check_output_dir(photos)  # no images left: fine
    (photos / "metadata.jsonl").write_text('{"file_name": "dog.jpg", "text": "a dog"}\n')
    with pytest.raises(gd.GraloraError, match="metadata.jsonl"):
        check_output_dir(photos)


def test_generate_writes_again_into_its_own_folder_and_names_are_unique(tmp_path):
    out = tmp_path / "gen"
    first = generate_samples("tiny", prompts=[PROMPT], steps=1, scales=[0.5, 0.5000001], output_dir=out, progress=False)
    assert len({p.name for p in first.images}) == 2 and all(p.is_file() for p in first.images)
    assert [p.name for p in first.images] == ["00_a-photo-of-sks-teapot_seed0_scale0.5.png",
                                              "00_a-photo-of-sks-teapot_seed0_scale0.5000001.png"]
    second = generate_samples("tiny", prompts=[PROMPT], seeds=[-3], steps=1, scales=[1], output_dir=out, progress=False)
    assert second.images[0].is_file()  # generate's own folder: written again without complaint
    for bad, words in (({"scales": [0.5, 0.5]}, "--scales lists 0.5"), ({"seeds": [1, 1]}, "--seeds lists 1")):
        with pytest.raises(gd.GraloraError, match=words):
            generate_samples("tiny", prompts=[PROMPT], steps=1, output_dir=out, progress=False, **bad)


def test_side_by_side_gralora_and_its_lora_baseline(adapter, sweep, tmp_path, capsys):
    """`--side-by-side`: a column per adapter alone; a GraLoRA adapter beside its exact LoRA export shows
    the same image twice, equal to the GraLoRA column of the plain sweep."""
    lora = Path(gd.export_lora(adapter, tmp_path / "lora" / "pytorch_lora_weights.safetensors").path)
    out = tmp_path / "side"
    assert cli_main(["generate", "--adapter", f"{adapter}:0.8", "--adapter", f"{lora.parent}:0.8", "--prompt", PROMPT,
                     "--steps", "2", "--side-by-side", "--output-dir", str(out)]) == 0
    assert "columns: adapter 1, lora 1" in capsys.readouterr().out
    first, second = out / "00_a-photo-of-sks-teapot_seed0_a0_scale1.png", out / "00_a-photo-of-sks-teapot_seed0_a1_scale1.png"
    assert np.abs(pixels(first) - pixels(sweep.images[1])).max() <= 2
    assert np.abs(pixels(second) - pixels(sweep.images[1])).max() <= 2
    assert Image.open(out / "grid.png").size == (LABEL_WIDTH + 2 * 64, HEADER_HEIGHT + 64)
