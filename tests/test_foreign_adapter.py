"""An adapter made for another base model is refused by our own check (module and both shapes), in one
line, before any library loads it and before any image is generated."""

import pytest
from conftest import SAMPLES

import gralora_diffusion as gd
from gralora_diffusion.any_adapter import check_adapter_fits
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.errors import AdapterFileError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world_adapters(tmp_path_factory):
    """A GraLoRA adapter made on the world model (UNet widths 64/128) and its two LoRA exports; the tiny
    SDXL (32/64) is another base for them."""
    folder = tmp_path_factory.mktemp("world_adapter")
    pipe = gd.patch_pipeline(gd.tiny_world_pipeline())
    gd.add_gralora(pipe, r=4, gralora_k=2, unet_targets="attn", text_encoder_targets="attn")
    pipe.save_gralora_weights(folder, base_model="world")
    gd.export_lora(folder, folder / "lora.safetensors")
    gd.export_lora(folder, folder / "lora_kohya.safetensors", format="kohya")
    return {"gralora": folder / "pytorch_gralora_weights.safetensors", "diffusers": folder / "lora.safetensors",
            "kohya": folder / "lora_kohya.safetensors"}


@pytest.mark.parametrize("kind", ["gralora", "diffusers", "kohya"])
def test_check_names_the_first_module_and_both_shapes(world_adapters, kind):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    with pytest.raises(AdapterFileError) as err:
        check_adapter_fits(pipe, world_adapters[kind])
    text = str(err.value)
    assert "another base model" in text and "\n" not in text
    assert "->" in text and text.count("(") >= 2  # the module here and the adapter's shapes
    check_adapter_fits(gd.patch_pipeline(gd.tiny_world_pipeline()), world_adapters[kind])  # its own base: fine


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_generate_refuses_in_one_line_with_no_library_log(world_adapters, kind, tmp_path, capsys):
    out = tmp_path / "gen"
    assert cli_main(["generate", "--base", "tiny", "--adapter", str(world_adapters[kind]), "--prompt", "a photo",
                     "--steps", "1", "--output_dir", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "another base model" in err[0] and "lora_A" in err[0]
    assert "size mismatch" not in captured.out + captured.err and "unsuccessful" not in captured.out + captured.err
    assert not list(out.glob("*.png")) if out.exists() else True


def test_evaluate_checks_every_adapter_before_the_base_column(world_adapters):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    calls = []
    original = type(pipe).__call__

    class Counting(type(pipe)):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return original(self, *args, **kwargs)

    pipe.__class__ = Counting
    with pytest.raises(AdapterFileError, match="another base model"):
        gd.evaluate_adapter(pipe=pipe, adapters=[world_adapters["kohya"]], instance_data_dir=SAMPLES, steps=1,
                            dino_model=None, clip_model=None, progress=False)
    assert calls == []  # nothing generated before the check


def test_a_mismatch_names_the_recorded_base_and_the_flag(world_adapters, tmp_path, capsys):
    out = tmp_path / "gen"
    assert cli_main(["generate", "--base", "tiny", "--adapter", str(world_adapters["gralora"]), "--prompt", "x",
                     "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "It records base" in err[0] and "this run's --base is tiny" in err[0] and "--base" in err[0]
