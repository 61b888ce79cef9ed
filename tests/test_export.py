"""Export to plain LoRA: exact closed form, SVD truncation, diffusers and kohya keys read by STOCK
diffusers `load_lora_weights`, bad inputs."""

import json
import math

import pytest
import torch
from conftest import generate, randomize_gralora_B
from peft import GraloraConfig
from safetensors import safe_open

import gralora_diffusion as gd
from gralora_diffusion.adapter_file import collect_adapter, read_adapter_file, save_adapter_file
from gralora_diffusion.cli import main as cli_main
from conftest import COMPONENTS
from gralora_diffusion.export import ExportError, export_lora, group_modules, lora_factors
from gralora_diffusion.export_names import diffusers_module, kohya_key, resolve_layers_per_block
from gralora_diffusion.inject import inject_config
from gralora_diffusion.tiny import TINY_MODEL_ID

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def write_adapter(pipe, path, base_model=TINY_MODEL_ID):
    state_dicts, configs = collect_adapter({c: getattr(pipe, c) for c in COMPONENTS})
    return save_adapter_file(path, state_dicts, configs, base_model=base_model)


def gralora_pipeline(path):
    """A fresh tiny pipeline carrying the adapter file, through our loader."""
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    pipe.load_gralora_weights(str(path))
    return pipe


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """r=4, k=2, hybrid_r=2 on the UNet (attn+ff) and both text encoders (attn+mlp), random B."""
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    gd.add_gralora(pipe, r=4, gralora_k=2, hybrid_r=2, unet_targets="attn+ff", text_encoder_targets="attn+mlp")
    for component in COMPONENTS:
        randomize_gralora_B(getattr(pipe, component), std=0.3)
    return write_adapter(pipe, tmp_path_factory.mktemp("adapter") / "adapter.safetensors")


@pytest.fixture(scope="module")
def reference_image(adapter_file):
    return generate(gralora_pipeline(adapter_file), steps=2)


@pytest.fixture(scope="module")
def base_image():
    return generate(gd.tiny_sdxl_pipeline(seed=0), steps=2)


def lora_layer_counts(pipe):
    from peft.tuners.lora import LoraLayer

    return {c: sum(isinstance(m, LoraLayer) for m in getattr(pipe, c).modules()) for c in COMPONENTS}


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exact_export_loads_in_stock_diffusers_with_equal_images(adapter_file, reference_image, base_image, tmp_path, fmt):
    report = export_lora(adapter_file, tmp_path / "lora.safetensors", format=fmt)
    assert report.exact and {m.rank for m in report.modules} == {2 * 4 + 2}
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))  # stock diffusers, no gralora code
    adapter = read_adapter_file(adapter_file)
    assert lora_layer_counts(pipe) == {c: len(group_modules(sd)) for c, sd in adapter.state_dicts.items()}
    image = generate(pipe, steps=2)
    assert abs(image - base_image).max() > 0.05  # the adapter acts
    assert abs(image - reference_image).max() <= 1e-5


def test_closed_form_equals_peft_delta_weight():
    for k, r, hybrid_r in [(2, 4, 0), (2, 4, 2), (4, 8, 4), (1, 4, 0)]:
        layer_model = torch.nn.ModuleDict({"proj": torch.nn.Linear(32, 48)})
        config = GraloraConfig(r=r, gralora_k=k, alpha=2 * r, hybrid_r=hybrid_r, target_modules=["proj"])
        inject_config(layer_model, config, "default")
        randomize_gralora_B(layer_model, std=0.5, seed=k + r)
        layer = layer_model["proj"]
        tensors = {"gralora_A": layer.gralora_A["default"], "gralora_B": layer.gralora_B["default"]}
        if hybrid_r:
            tensors["gralora_A_general.weight"] = layer.gralora_A_general["default"].weight
            tensors["gralora_B_general.weight"] = layer.gralora_B_general["default"].weight
        cfg = {"r": r, "gralora_k": k, "alpha": 2 * r, "hybrid_r": hybrid_r}
        down, up = lora_factors({n: t.detach() for n, t in tensors.items()}, cfg)
        assert down.shape == (k * r + hybrid_r, 32) and up.shape == (48, k * r + hybrid_r)
        expected = layer.get_delta_weight("default").detach()
        torch.testing.assert_close(up @ down, expected, rtol=1e-6, atol=1e-6)
        # and the layer's forward adds exactly x @ ΔWᵀ
        x = torch.randn(3, 32)
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ (up @ down).T, rtol=1e-5, atol=1e-5)


def export_tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def delta_weights(path):
    tensors, _ = export_tensors(path)
    return {k[: -len(".lora_A.weight")]: tensors[k.replace("lora_A", "lora_B")] @ v for k, v in tensors.items() if k.endswith("lora_A.weight")}


def test_svd_full_rank_equals_exact_and_low_rank_energy_matches_error(adapter_file, tmp_path):
    exact = delta_weights(export_lora(adapter_file, tmp_path / "exact.safetensors").path)
    full = export_lora(adapter_file, tmp_path / "full.safetensors", rank=10)
    assert full.exact and abs(full.overall_energy - 1) < 1e-6
    for name, dw in delta_weights(full.path).items():
        torch.testing.assert_close(dw, exact[name], rtol=1e-4, atol=1e-5)

    low = export_lora(adapter_file, tmp_path / "low.safetensors", rank=3)
    assert not low.exact and {m.rank for m in low.modules} == {3}
    approx = delta_weights(low.path)
    err2 = total2 = 0.0
    for m in low.modules:
        name = f"{m.component}.{diffusers_module(m.component, m.module)}"
        residual = float((exact[name] - approx[name]).double().square().sum())
        norm = float(exact[name].double().square().sum())
        assert math.isclose(math.sqrt(residual / norm), math.sqrt(1 - m.energy), rel_tol=1e-3, abs_tol=1e-4)
        err2, total2 = err2 + residual, total2 + norm
    assert math.isclose(math.sqrt(err2 / total2), math.sqrt(1 - low.overall_energy), rel_tol=1e-3)
    assert 0 < low.overall_energy < 1
    assert low.size_bytes < full.size_bytes


def test_diffusers_header_metadata(adapter_file, tmp_path):
    report = export_lora(adapter_file, tmp_path / "lora.safetensors", dtype="fp16")
    tensors, header = export_tensors(report.path)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    meta = json.loads(header["lora_adapter_metadata"])
    assert meta["unet.r"] == meta["unet.lora_alpha"] == 10 and meta["text_encoder_2.lora_alpha"] == 10
    assert "encoder.layers.0.self_attn.q_proj" in meta["text_encoder.target_modules"]
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0") for k in tensors)


SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the block layout fields
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def test_kohya_names_round_trip_through_diffusers_converter_on_sdxl_layout():
    """Every Linear in every attention block of SDXL base (722 modules, built on the meta device)
    gets a kohya name that diffusers' own kohya->diffusers conversion maps back to that module."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    modules = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attentions." in n}
    assert len(modules) == 722
    assert kohya_key("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2) == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    state_dict = {}
    for module in modules:
        name = kohya_key("unet", module, 2)
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            state_dict[f"{name}.{suffix}"] = torch.zeros(1)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state_dict, unet.config))
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")} == modules


def test_kohya_export_on_sdxl_block_layout_with_tiny_widths(tmp_path):
    """SDXL's block layout (no attention at level 0, layers_per_block=2, 1/2/2 transformer layers) at
    tiny widths: the kohya file read by stock diffusers gives the GraLoRA UNet's output."""
    from diffusers import UNet2DConditionModel

    from gralora_diffusion import tiny

    config = {**SDXL_UNET, "sample_size": 8, "block_out_channels": (16, 32, 64), "transformer_layers_per_block": (1, 2, 2),
              "attention_head_dim": (2, 4, 8), "cross_attention_dim": 2 * tiny.TEXT_HIDDEN, "norm_num_groups": 8,
              "addition_time_embed_dim": tiny.TIME_EMBED_DIM,
              "projection_class_embeddings_input_dim": 6 * tiny.TIME_EMBED_DIM + tiny.TEXT_PROJECTION}

    def pipeline():
        pipe = gd.tiny_sdxl_pipeline(seed=0)
        torch.manual_seed(3)
        pipe.unet = UNet2DConditionModel(**config).eval()
        return pipe

    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(1, 77, 2 * tiny.TEXT_HIDDEN, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(1, tiny.TEXT_PROJECTION, generator=g),
                                     "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    pipe = pipeline()
    with torch.no_grad():
        base = pipe.unet(**inputs).sample
    gd.add_gralora(pipe, r=4, gralora_k=2, hybrid_r=2, unet_targets="attn+ff")
    randomize_gralora_B(pipe.unet, std=0.3)
    with torch.no_grad():
        expected = pipe.unet(**inputs).sample
    path = write_adapter(pipe, tmp_path / "adapter.safetensors", base_model="sdxl-layout")
    export_lora(path, tmp_path / "kohya.safetensors", format="kohya")  # layers_per_block=2 read off the up-block names
    stock = pipeline()
    stock.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    with torch.no_grad():
        got = stock.unet(**inputs).sample
    assert (expected - base).abs().max() > 0.05
    assert (got - expected).abs().max() <= 1e-5


def test_layers_per_block_from_base_config_names_or_argument(adapter_file, tmp_path):
    adapter = read_adapter_file(adapter_file)
    assert resolve_layers_per_block(adapter, None) == 1  # base_model = the tiny id: its UNet config
    adapter.metadata.pop("base_model")
    assert resolve_layers_per_block(adapter, None) == 1  # no base model: up blocks have attentions 0..1
    folder = tmp_path / "base" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"layers_per_block": 3}))
    adapter.metadata["base_model"] = str(tmp_path / "base")
    assert resolve_layers_per_block(adapter, None) == 3 and resolve_layers_per_block(adapter, 2) == 2


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "comfy"}, "pick one of diffusers, kohya"),
        ({"rank": 0}, "integer >= 1"),
        ({"rank": 33}, "at most 32"),
        ({"dtype": "int8"}, "fp32, fp16, bf16"),
        ({"max_size": 1000}, "more than the"),
    ],
)
def test_bad_export_arguments_leave_nothing(adapter_file, tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_lora(adapter_file, tmp_path / "out.safetensors", **kwargs)
    assert leftovers(tmp_path) == []


def test_lora_file_as_source_is_re_exported_and_kohya_sources_refused(adapter_file, tmp_path):
    """A diffusers-layout LoRA (here our own export) re-exports to the same tensors; a kohya-keyed one
    is refused, leaving nothing behind (test_lora_baseline.py covers the trainer's LoRA files)."""
    lora = export_lora(adapter_file, tmp_path / "lora.safetensors").path
    again = export_lora(lora, tmp_path / "again.safetensors")
    first, second = export_tensors(lora)[0], export_tensors(again.path)[0]
    assert again.exact and first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    kohya = export_lora(adapter_file, tmp_path / "kohya.safetensors", format="kohya").path
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(gd.GraloraError, match="kohya keys already"):
        export_lora(kohya, out / "again.safetensors", format="diffusers")
    assert leftovers(out) == []


def test_cli_export_lora(adapter_file, tmp_path, capsys):
    dst = tmp_path / "lora_kohya.safetensors"
    assert cli_main(["export-lora", str(adapter_file.parent), str(dst), "--format", "kohya", "--dtype", "fp16", "--rank", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size_bytes"] == dst.stat().st_size and report["format"] == "kohya" and not report["exact"]
    tensors, header = export_tensors(dst)
    assert header["ss_network_dim"] == "4" and tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == 4
    assert cli_main(["export-lora", str(adapter_file), str(tmp_path / "x.safetensors"), "--max-size", "0.001"]) == 2
    assert "more than the" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
