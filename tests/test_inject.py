"""add_gralora: targets, presets, several adapters, and every bad-input error."""

import re

import pytest
import torch
import torch.nn as nn

import gralora_diffusion as gd
from gralora_diffusion.errors import GraloraConfigError


def gralora_module_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, gd.GraloraLinear)}


def test_unet_attn_preset_targets_every_attention_projection(tiny_pipe):
    configs = gd.add_gralora(tiny_pipe, r=4, gralora_k=2)
    assert set(configs) == {"unet"}
    names = gralora_module_names(tiny_pipe.unet)
    expected = {
        n
        for n, m in tiny_pipe.unet.named_modules()
        if re.search(r"\.(to_q|to_k|to_v|to_out\.0)$", n) and not n.endswith("base_layer")
    }
    # 7 transformer blocks (2 down, 1 mid, 4 up) x 2 attentions x 4 projections
    assert names == expected and len(names) == 7 * 2 * 4
    assert not gralora_module_names(tiny_pipe.text_encoder)


def test_presets_for_text_encoders_and_ff(tiny_pipe):
    configs = gd.add_gralora(tiny_pipe, r=4, unet_targets="attn+ff", text_encoder_targets="attn+mlp")
    assert set(configs) == {"unet", "text_encoder", "text_encoder_2"}
    unet_last = {n.split(".")[-1] for n in gralora_module_names(tiny_pipe.unet)}
    assert {"proj_in", "proj_out", "proj", "2"} <= unet_last
    te_last = {n.split(".")[-1] for n in gralora_module_names(tiny_pipe.text_encoder_2)}
    assert te_last == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_regex_and_bare_models(tiny_pipe):
    gd.add_gralora(tiny_pipe.unet, r=4, unet_targets=r".*mid_block.*to_q|.*up_blocks\.1.*attn2\.to_k")
    names = gralora_module_names(tiny_pipe.unet)
    assert names and all(("mid_block" in n and n.endswith("to_q")) or n.endswith("attn2.to_k") for n in names)
    gd.add_gralora(tiny_pipe.text_encoder, r=4)  # a bare text encoder gets the text preset
    assert {n.split(".")[-1] for n in gralora_module_names(tiny_pipe.text_encoder)} == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_second_adapter_sits_beside_the_first(tiny_pipe):
    gd.add_gralora(tiny_pipe, r=4, adapter_name="a")
    gd.add_gralora(tiny_pipe, r=8, gralora_k=4, adapter_name="b")
    layer = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert set(layer.gralora_A) == {"a", "b"}
    assert layer.gralora_A["b"].shape == (4, 32 // 4, 8)
    assert tiny_pipe.get_list_adapters()["unet"] == ["a", "b"]
    summary = gd.adapter_summary(tiny_pipe)["unet"]
    assert summary["b"]["effective_rank"] == 32 and summary["a"]["effective_rank"] == 8


def unet_state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=6, gralora_k=4), "r=6 is not divisible by gralora_k=4"),
        (dict(r=4, gralora_k=0), "gralora_k=0"),
        (dict(r=0), "r=0: the rank must be an integer >= 1"),
        (dict(r=4, hybrid_r=-1), "hybrid_r=-1"),
        (dict(r=3, gralora_k=3), "Linear 32->32 is not divisible by gralora_k=3"),
        (dict(r=4, unet_targets=["no_such_module"]), "match no module. Linear modules that exist here"),
        (dict(r=4, unet_targets=["conv1"]), "GraLoRA adapts nn.Linear only"),
        (dict(r=4, unet_targets=r"(unclosed"), "neither a preset"),
    ],
)
def test_bad_arguments_raise_before_touching_modules(tiny_pipe, kwargs, message):
    before = unet_state(tiny_pipe)
    with pytest.raises(GraloraConfigError, match=re.escape(message)):
        gd.add_gralora(tiny_pipe, **kwargs)
    after = unet_state(tiny_pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not gralora_module_names(tiny_pipe.unet)


def test_width_error_names_the_module():
    model = nn.Sequential()
    model.add_module("odd", nn.Linear(30, 16))
    with pytest.raises(GraloraConfigError, match=r"Sequential\.odd: Linear 30->16 is not divisible by gralora_k=4"):
        gd.add_gralora(model, r=4, gralora_k=4, unet_targets=["odd"])


def test_existing_adapter_name_is_refused_and_kept(tiny_pipe):
    gd.add_gralora(tiny_pipe, r=4, adapter_name="mine")
    layer = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    A = layer.gralora_A["mine"].detach().clone()
    with pytest.raises(GraloraConfigError, match="an adapter named 'mine' already exists"):
        gd.add_gralora(tiny_pipe, r=8, adapter_name="mine")
    assert torch.equal(layer.gralora_A["mine"], A) and layer.r["mine"] == 4


@pytest.mark.parametrize("name", ["half", "to", "a.b", ""])
def test_adapter_names_that_clash_with_torch_are_refused(tiny_pipe, name):
    with pytest.raises(GraloraConfigError, match="adapter_name="):
        gd.add_gralora(tiny_pipe, r=4, adapter_name=name)
    assert not gralora_module_names(tiny_pipe.unet)


def test_add_gralora_keeps_a_lora_beside_active(tiny_pipe):
    from peft import LoraConfig

    tiny_pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q"]), adapter_name="lora")
    gd.add_gralora(tiny_pipe, r=4, unet_targets=["to_k"], adapter_name="gra")
    attn = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.to_q.active_adapters == ["lora"]
    assert attn.to_k.active_adapters == ["gra"]
