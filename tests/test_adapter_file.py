"""The adapter file and the other forms an adapter comes in: function-form save/read, PEFT key
prefixes, PEFT save_pretrained folders, and the state-dict form of load_gralora_weights."""

import json

import pytest
import torch
import torch.nn as nn
from peft import GraloraConfig, LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open

import gralora_diffusion as gd
from gralora_diffusion.adapter_file import (
    collect_adapter,
    from_flat_state_dict,
    normalize_module_key,
    read_peft_folder,
    save_adapter_file,
)
from gralora_diffusion.sources import adapter_from_state_dict

CONFIG = {"r": 4, "alpha": 8, "gralora_k": 2, "hybrid_r": 2, "target_modules": ["to_q", "to_v"], "gralora_dropout": 0.0}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_v, self.other = nn.Linear(16, 8), nn.Linear(16, 16), nn.Linear(16, 16)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])


def toy_with_adapter(name="default"):
    model = Toy()
    inject_adapter_in_model(GraloraConfig(**CONFIG, init_weights=False), model, name)
    return model


def test_function_form_round_trip_with_dtype_and_header(tmp_path):
    model = toy_with_adapter()
    state_dicts, configs = collect_adapter({"unet": model})
    path = save_adapter_file(tmp_path / "a.safetensors", state_dicts, configs, base_model="org/base",
                             metadata={"instance_prompt": "a sks teapot"}, dtype=torch.bfloat16)
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["format"] == "gralora-diffusion" and header["format_version"] == "1"
    assert json.loads(header["gralora_configs"]) == {"unet": CONFIG}
    adapter = gd.read_adapter_file(path)
    assert adapter.base_model == "org/base" and adapter.metadata["instance_prompt"] == "a sks teapot"
    assert adapter.configs == {"unet": CONFIG}
    for key, tensor in state_dicts["unet"].items():
        assert adapter.state_dicts["unet"][key].dtype == torch.bfloat16
        assert torch.equal(adapter.state_dicts["unet"][key], tensor.to(torch.bfloat16))
    assert sorted(adapter.state_dicts["unet"]) == sorted(state_dicts["unet"])
    assert all(k.startswith("blocks.") for k in adapter.state_dicts["unet"])  # PEFT names, no adapter name


def test_peft_prefix_and_base_layer_hops_are_normalized():
    assert normalize_module_key("base_model.model.a.to_q.gralora_A") == "a.to_q.gralora_A"
    assert normalize_module_key("a.to_q.base_layer.base_layer.gralora_A_general.weight") == "a.to_q.gralora_A_general.weight"
    model = toy_with_adapter()
    sd = get_peft_model_state_dict(model)
    flat = {f"unet.base_model.model.{k}": v for k, v in sd.items()}
    assert from_flat_state_dict(flat, {"unet": CONFIG}).state_dicts["unet"].keys() == sd.keys()
    both = {**flat, **{f"unet.{k}": v for k, v in sd.items()}}
    with pytest.raises(gd.AdapterFileError, match="repeats"):
        from_flat_state_dict(both, {"unet": CONFIG})


def test_collect_adapter_under_a_lora_keeps_plain_module_names():
    """A LoRA injected after the GraLoRA wraps it: PEFT's keys gain `base_layer`; saved keys must not."""
    model = toy_with_adapter("g")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), model, "lora")
    assert any(".base_layer.gralora_A" in k for k in get_peft_model_state_dict(model, adapter_name="g"))
    state_dicts, _ = collect_adapter({"unet": model}, "g")
    assert not any("base_layer" in k for k in state_dicts["unet"])
    assert "blocks.0.to_q.gralora_A" in state_dicts["unet"]


@pytest.mark.parametrize("layout", ["unet_alone", "per_component"])
def test_read_peft_save_pretrained_folder(tmp_path, layout):
    model = Toy()
    peft_model = get_peft_model(model, GraloraConfig(**CONFIG, init_weights=False))
    peft_model.save_pretrained(tmp_path / "unet" if layout == "per_component" else tmp_path)
    adapter = read_peft_folder(tmp_path)
    assert adapter.configs == {"unet": CONFIG}
    expected = {normalize_module_key(k): v for k, v in get_peft_model_state_dict(peft_model).items()}
    assert adapter.state_dicts["unet"].keys() == expected.keys()
    assert all(torch.equal(adapter.state_dicts["unet"][k], v) for k, v in expected.items())


def _peft_folder(tmp_path, **config_changes):
    get_peft_model(Toy(), GraloraConfig(**CONFIG)).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(config_changes)
    config_path.write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "LORA"}, "load_lora_weights"),
    ({"modules_to_save": ["other"]}, "not supported"),
    ({"bias": "all"}, "not supported"),
])
def test_peft_folder_refusals(tmp_path, change, message):
    with pytest.raises(gd.AdapterFileError, match=message):
        read_peft_folder(_peft_folder(tmp_path, **change))


def test_peft_folder_with_pickle_weights_only_is_refused(tmp_path):
    folder = _peft_folder(tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(gd.AdapterFileError, match="never unpickle"):
        read_peft_folder(folder)
    (folder / "unet").mkdir()
    (folder / "unet" / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    with pytest.raises(gd.AdapterFileError, match="keep one layout"):
        read_peft_folder(folder)


def test_state_dict_forms():
    model = toy_with_adapter()
    sd = get_peft_model_state_dict(model)
    flat = {f"unet.{k}": v for k, v in sd.items()}
    forms = [
        adapter_from_state_dict(flat, {"unet": CONFIG}),
        adapter_from_state_dict({"unet": sd}, {"unet": GraloraConfig(**CONFIG)}),
        adapter_from_state_dict(flat, json.dumps({"unet": CONFIG}), metadata={"base_model": "org/base"}),
    ]
    for adapter in forms:
        assert adapter.configs == {"unet": CONFIG} and adapter.state_dicts["unet"].keys() == sd.keys()
    assert forms[2].base_model == "org/base"
    with pytest.raises(gd.AdapterFileError, match="needs its configs"):
        adapter_from_state_dict(flat)
    with pytest.raises(gd.AdapterFileError, match="unknown fields"):
        adapter_from_state_dict(flat, {"unet": {**CONFIG, "use_dora": True}})
    with pytest.raises(gd.AdapterFileError, match="do not fit"):
        adapter_from_state_dict(flat, {"unet": {**CONFIG, "r": 8}})
