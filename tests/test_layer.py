"""The injected layer computes exactly DESIGN.md §1's block update."""

import pytest
import torch
import torch.nn as nn

import gralora_diffusion as gd
from conftest import randomize_gralora_B


def block_delta_weight(layer, adapter="default"):
    """ΔW built from the block formula: block (out j, in n) = s·(A[n][:, j t:(j+1) t] @ B[j][n t:(n+1) t, :])ᵀ."""
    A, B = layer.gralora_A[adapter], layer.gralora_B[adapter]  # [k, in/k, r], [k, r, out/k]
    k, r = layer.gralora_k[adapter], layer.r[adapter]
    t = r // k
    out_k, in_k = B.shape[2], A.shape[1]
    delta = torch.zeros(k * out_k, k * in_k, dtype=torch.float64)
    for j in range(k):
        for n in range(k):
            block = (A[n][:, j * t : (j + 1) * t].double() @ B[j][n * t : (n + 1) * t, :].double()).T
            delta[j * out_k : (j + 1) * out_k, n * in_k : (n + 1) * in_k] = block
    if layer.hybrid_r[adapter]:
        delta += layer.gralora_B_general[adapter].weight.double() @ layer.gralora_A_general[adapter].weight.double()
    return layer.scaling[adapter] * delta


def one_layer(in_features=64, out_features=32, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(in_features, out_features))
    gd.add_gralora(model, unet_targets=["proj"], **kwargs)
    randomize_gralora_B(model)
    return model, model.proj


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("hybrid_r", [0, 4])
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64)])
def test_update_matches_block_formula(k, hybrid_r, shape):
    model, layer = one_layer(r=8, gralora_k=k, hybrid_r=hybrid_r)
    assert isinstance(layer, gd.GraloraLinear)
    x = torch.randn(*shape)
    with torch.no_grad():
        update = (layer(x) - layer.get_base_layer()(x)).double()
        expected = x.double() @ block_delta_weight(layer).T
    rel = (update - expected).norm() / expected.norm()
    assert expected.norm() > 0
    assert rel <= 1e-6


@pytest.mark.parametrize("k,hybrid_r", [(2, 0), (4, 0), (2, 4)])
def test_delta_weight_rank_and_parameter_count(k, hybrid_r):
    r = 8
    model, layer = one_layer(in_features=64, out_features=64, r=r, gralora_k=k, hybrid_r=hybrid_r)
    delta = layer.get_delta_weight("default")
    assert torch.allclose(delta.double(), block_delta_weight(layer), atol=1e-6)
    # fp32 rounding fills the null space with ~1e-8 singular values: count the ones above 1e-4 of the largest
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-4).item() == k * r + hybrid_r
    n_params = sum(p.numel() for n, p in model.named_parameters() if "gralora" in n)
    assert n_params == (r + hybrid_r) * (64 + 64)


def test_alpha_defaults_to_twice_the_rank():
    _, layer = one_layer(r=8, gralora_k=2, hybrid_r=4)
    assert layer.alpha["default"] == 16
    assert layer.scaling["default"] == pytest.approx(16 / 12)


def test_scale_methods_follow_lora_semantics():
    _, layer = one_layer(r=8, gralora_k=2, alpha=4)
    base = 4 / 8
    layer.set_scale("default", 0.5)
    assert layer.scaling["default"] == pytest.approx(0.5 * base)
    layer.scale_layer(3.0)
    assert layer.scaling["default"] == pytest.approx(1.5 * base)
    layer.unscale_layer(3.0)
    assert layer.scaling["default"] == pytest.approx(0.5 * base)
    layer.unscale_layer()
    assert layer.scaling["default"] == pytest.approx(base)
    layer.set_scale("missing", 2.0)  # unknown adapters are ignored, as in PEFT's LoRA
    assert "missing" not in layer.scaling


def test_forward_under_autocast_runs_and_matches_peft():
    from peft.tuners.gralora.layer import Linear as PeftGraloraLinear

    _, layer = one_layer(r=8, gralora_k=2, hybrid_r=2)
    x = torch.randn(3, 5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = layer(x)
        peft = PeftGraloraLinear.forward(layer, x)
    ours.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Our fast path computes in autocast's dtype like PEFT's matmuls, and keeps the base output's
    # dtype as nn.Linear does (PEFT's GraLoRA casts back to the input's dtype).
    assert ours.dtype == torch.bfloat16 and peft.dtype == torch.float32
    assert ((ours.double() - peft.double()).norm() / peft.double().norm()).item() <= 1e-2
