"""diffusers' own scale paths on GraLoRA layers: per-call scale, fuse at a scale, set_adapters."""

import numpy as np
import pytest
import torch

import gralora_diffusion as gd
from conftest import generate, randomize_gralora_B
from conftest import COMPONENTS


def weights(pipe):
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items() if "gralora" not in k} for c in COMPONENTS}


@pytest.fixture
def adapted(tiny_pipe):
    base = generate(tiny_pipe)
    gd.add_gralora(tiny_pipe, r=8, gralora_k=2, hybrid_r=4, text_encoder_targets="attn")
    for c in COMPONENTS:
        randomize_gralora_B(getattr(tiny_pipe, c))
    return tiny_pipe, base


@pytest.mark.parametrize("scale", [0.3, 1.7])
def test_per_call_scale_equals_fused_at_that_scale(adapted, scale):
    pipe, base = adapted
    full = generate(pipe)
    per_call = generate(pipe, cross_attention_kwargs={"scale": scale})
    assert np.abs(full - base).max() > 1e-2  # the adapter acts
    assert np.abs(per_call - full).max() > 1e-3  # and the scale changes it
    before = weights(pipe)
    pipe.fuse_lora(components=list(COMPONENTS), lora_scale=scale)
    fused = generate(pipe)
    assert np.abs(fused - per_call).max() <= 1e-4
    pipe.unfuse_lora(components=list(COMPONENTS))
    after = weights(pipe)
    for c in COMPONENTS:
        for k in before[c]:
            assert torch.allclose(before[c][k], after[c][k], atol=1e-6), (c, k)


def test_scale_zero_is_the_base_pipeline(adapted):
    pipe, base = adapted
    assert np.abs(generate(pipe, cross_attention_kwargs={"scale": 0.0}) - base).max() <= 1e-6
    # and the scale is restored after the call
    assert np.abs(generate(pipe) - generate(pipe, cross_attention_kwargs={"scale": 1.0})).max() == 0


def test_two_adapters_weighted_equal_the_sum_of_their_deltas(tiny_pipe):
    gd.add_gralora(tiny_pipe, r=4, gralora_k=2, adapter_name="a")
    gd.add_gralora(tiny_pipe, r=8, gralora_k=4, hybrid_r=2, adapter_name="b")
    randomize_gralora_B(tiny_pipe.unet, seed=3)
    wa, wb = 0.8, -0.5
    tiny_pipe.set_adapters(["a", "b"], [wa, wb])
    x = torch.randn(2, 16, 32)
    layer = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    base = layer.get_base_layer()
    with torch.no_grad():
        got = layer(x) - base(x)
        expected = x @ (layer.get_delta_weight("a") + layer.get_delta_weight("b")).T
        layer.set_scale("a", 1.0)
        layer.set_scale("b", 1.0)
        unit = x @ (wa * layer.get_delta_weight("a") + wb * layer.get_delta_weight("b")).T
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got, unit, atol=1e-6)
    # and on the whole pipeline: the weighted pair equals the pair fused at those weights
    tiny_pipe.set_adapters(["a", "b"], [wa, wb])
    weighted = generate(tiny_pipe)
    tiny_pipe.fuse_lora(components=["unet"], adapter_names=["a", "b"])
    assert np.abs(generate(tiny_pipe) - weighted).max() <= 1e-4
