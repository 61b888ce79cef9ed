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
