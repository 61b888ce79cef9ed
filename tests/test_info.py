import json

import pytest
import torch


import gralora_diffusion as gd
from gralora_diffusion.constants import WEIGHT_NAME
from gralora_diffusion.adapter_file import collect_adapter, save_adapter_file
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.export import export_lora
from gralora_diffusion.tiny import TINY_MODEL_ID

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """UNet attn r=8 k=4 hybrid 4; text encoders attn+mlp r=4 k=2, alpha 3, in fp16."""
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    gd.add_gralora(pipe, r=8, gralora_k=4, hybrid_r=4, unet_targets="attn", adapter_name="u")
    gd.add_gralora(pipe.text_encoder, r=4, gralora_k=2, alpha=3, text_encoder_targets="attn+mlp", adapter_name="u")
    gd.add_gralora(pipe.text_encoder_2, r=4, gralora_k=2, alpha=3, text_encoder_targets="attn+mlp", adapter_name="u")
    state_dicts, configs = collect_adapter({c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")}, "u")
    path = tmp_path_factory.mktemp("info") / WEIGHT_NAME
    save_adapter_file(path, state_dicts, configs, base_model=TINY_MODEL_ID, dtype=torch.float16)
    return path, gd.adapter_summary(pipe)


def test_info_json_numbers(known, capsys, tmp_path):
    path, summary = known
    assert cli_main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 1 and info["base_model"] == TINY_MODEL_ID and info["dtype"] == "float16"
    assert info["file_size"] == path.stat().st_size
    unet, te = info["components"]["unet"], info["components"]["text_encoder"]
    assert (unet["r"], unet["k"], unet["hybrid_r"], unet["alpha"], unet["exact_lora_rank"]) == (8, 4, 4, 16, 36)
    assert unet["scaling"] == pytest.approx(16 / 12)
    assert (te["r"], te["k"], te["hybrid_r"], te["alpha"], te["exact_lora_rank"]) == (4, 2, 0, 3, 8)
    assert sorted(te["targets"]) == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    for component, entry in info["components"].items():  # counted independently, on the live model
        assert (entry["modules"], entry["params"]) == (summary[component]["u"]["modules"], summary[component]["u"]["params"])
    assert unet["modules"] == 7 * 2 * 4  # 7 transformer blocks x (attn1, attn2) x (q, k, v, out)
    assert info["params"] == sum(e["params"] for e in info["components"].values())
    export = export_lora(path, tmp_path / "lora.safetensors")
    assert export.dtype == "float16" and info["lora_export"]["rank"] == {"unet": 36, "text_encoder": 8, "text_encoder_2": 8}
    assert info["lora_export"]["size_bytes"] <= export.size_bytes <= info["lora_export"]["size_bytes"] + 64_000


def test_info_text_on_folder(known, capsys):
    path, _ = known
    assert cli_main(["info", str(path.parent)]) == 0  # a folder holding pytorch_gralora_weights.safetensors
    out = capsys.readouterr().out
    assert f"base model      {TINY_MODEL_ID}" in out and "exact LoRA export" in out
    unet_row = next(line.split() for line in out.splitlines() if line.startswith("unet "))
    assert unet_row[:2] == ["unet", "56"] and unet_row[3:8] == ["8", "4", "4", "16", "36"]


def test_info_on_missing_file(tmp_path, capsys):
    assert cli_main(["info", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_info_on_a_plain_lora_file(known, format, capsys, tmp_path):
    """`info` reads a LoRA file (our exports here, both key styles): format, rank and alpha per
    component, modules, parameters and dtype, counted independently from the tensors."""
    from safetensors.torch import load_file

    path, summary = known
    lora = export_lora(path, tmp_path / "lora.safetensors", format=format).path
    assert cli_main(["info", str(lora), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["format"], info["dtype"]) == ("lora", format, "float16")
    tensors = load_file(lora)
    assert info["params"] == sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))
    expected_rank = {"unet": 36, "text_encoder": 8, "text_encoder_2": 8}  # k*r + hybrid_r
    assert list(info["components"]) == ["unet", "text_encoder", "text_encoder_2"]
    for component, entry in info["components"].items():
        assert entry["rank"] == str(expected_rank[component]) and entry["alpha"] == expected_rank[component]
        assert entry["modules"] == summary[component]["u"]["modules"]
    assert info["components"]["unet"]["targets"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert info["gralora_export"]["exact"] is True
    assert cli_main(["info", str(lora)]) == 0
    out = capsys.readouterr().out
    assert f"plain LoRA, {format} keys (exported from a GraLoRA adapter)" in out
    unet_row = next(line.split() for line in out.splitlines() if line.startswith("unet "))
    assert unet_row[1] == "56" and unet_row[3:5] == ["36", "36"]


def test_info_on_a_diffusers_saved_lora_folder(tmp_path, capsys):
    """The trainer's `--adapter lora` output: diffusers' save_lora_weights with PEFT's config in the header."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = gd.tiny_sdxl_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v"]))
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, safe_serialization=True, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    assert cli_main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    unet = info["components"]["unet"]
    assert (info["kind"], info["format"], info["dtype"]) == ("lora", "diffusers", "float32")
    assert (unet["modules"], unet["rank"], unet["alpha"], unet["targets"]) == (7 * 2 * 2, "4", 6, ["to_q", "to_v"])
    assert unet["params"] == sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
