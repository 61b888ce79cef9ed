"""`merge`: the adapter fused into the base at a scale, a pipeline folder stock diffusers loads, giving
the images the adapter gives at that scale."""

import numpy as np
import pytest
from conftest import generate, randomize_gralora_B

import gralora_diffusion as gd
from gralora_diffusion.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    gd.add_gralora(pipe, r=4, gralora_k=2, hybrid_r=2, unet_targets="attn+ff", text_encoder_targets="attn")
    for component in ("unet", "text_encoder", "text_encoder_2"):
        randomize_gralora_B(getattr(pipe, component), std=0.3)
    pipe.save_gralora_weights(folder)
    gd.export_lora(folder, folder / "lora.safetensors")
    return folder


@pytest.mark.parametrize("kind", ["gralora", "lora"])
def test_merged_folder_loads_in_stock_diffusers_with_the_adapters_images(adapter, kind, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    source = adapter / ("pytorch_gralora_weights.safetensors" if kind == "gralora" else "lora.safetensors")
    out = tmp_path / "merged"
    assert cli_main(["merge", str(source), "--base", "tiny", "--scale", "0.5", "--output_dir", str(out)]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    merged = StableDiffusionXLPipeline.from_pretrained(out)  # stock diffusers, no patch
    reference = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    gd.load_any_adapter(reference, str(source), "a")
    expected = generate(reference, cross_attention_kwargs={"scale": 0.5})
    base = generate(gd.tiny_sdxl_pipeline(seed=0))
    got = generate(merged)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - base).max() > 1e-3  # the adapter is in the weights


def test_merge_refuses_a_foreign_adapter_before_writing(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli_main(["merge", str(adapter / "lora.safetensors"), "--base", "world", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another base model" in err[0] and not out.exists()
