"""Our in-place GraLoRA forward equals PEFT's: outputs and gradients, in every branch of PEFT's forward."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from peft import GraloraConfig, inject_adapter_in_model
from peft.tuners.gralora.layer import Linear as PeftGraloraLinear

import gralora_diffusion as gd
from conftest import randomize_gralora_B


def peft_and_ours(k=2, hybrid_r=0, dropout=0.0, adapters=("default",), dtype=torch.float32, adapter_dtype=None):
    """The same PEFT-injected layer twice: PEFT's class, and ours (a class swap, same state)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 32))
    for n, name in enumerate(adapters):
        config = GraloraConfig(r=8, gralora_k=k, alpha=16 + n, hybrid_r=hybrid_r, gralora_dropout=dropout, target_modules=["proj"])
        inject_adapter_in_model(config, model, name)
    randomize_gralora_B(model)
    model.to(dtype)
    if adapter_dtype is not None:  # base in one dtype, adapter in another (PEFT's autocast_adapter_dtype)
        for n, p in model.named_parameters():
            if "gralora" in n:
                p.data = p.data.to(adapter_dtype)
    model.proj.set_adapter(list(adapters))
    ours = copy.deepcopy(model)
    assert type(model.proj) is PeftGraloraLinear
    ours.proj.__class__ = gd.GraloraLinear
    return model, ours


def run(model, x, seed=0, autocast=None):
    """Output and the gradients w.r.t. the input and every adapter parameter; the forward under
    CPU autocast to `autocast` when given, the backward outside it, as a training loop does."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
        out = model(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out * weight).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return out.detach(), grads


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same(model, ours, x, tol=1e-6, seed=0):
    out_ref, grads_ref = run(model, x, seed)
    out, grads = run(ours, x, seed)
    assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
    assert rel(out, out_ref) <= tol
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert (grads[name] is None) == (grads_ref[name] is None), name
        if grads_ref[name] is not None:
            assert rel(grads[name], grads_ref[name]) <= tol, name
    return grads


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("hybrid_r", [0, 4])
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64)])
def test_outputs_and_gradients_equal_peft(k, hybrid_r, shape):
    model, ours = peft_and_ours(k=k, hybrid_r=hybrid_r)
    grads = assert_same(model, ours, torch.randn(*shape))
    names = {n.split(".")[1] for n in grads if "gralora" in n}
    assert {"gralora_A", "gralora_B"} <= names
    if hybrid_r:
        assert {"gralora_A_general", "gralora_B_general"} <= names


@pytest.mark.parametrize("hybrid_r", [0, 4])
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64)])
def test_dropout_in_train_mode_same_seed(hybrid_r, shape):
    model, ours = peft_and_ours(k=2, hybrid_r=hybrid_r, dropout=0.3)
    model.train(), ours.train()
    assert_same(model, ours, torch.randn(*shape), seed=3)
    out_a, _ = run(ours, torch.randn(*shape), seed=3)
    out_b, _ = run(ours, torch.randn(*shape), seed=4)
    assert not torch.equal(out_a, out_b)  # dropout acts


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_multiple_active_adapters():
    model, ours = peft_and_ours(k=2, hybrid_r=4, adapters=("a", "b"))
    assert ours.proj.active_adapters == ["a", "b"]
    assert_same(model, ours, torch.randn(2, 7, 64))


def test_disabled_and_merged():
    model, ours = peft_and_ours(k=4, hybrid_r=4)
    x = torch.randn(2, 7, 64)
    for m in (model, ours):
        m.proj.enable_adapters(False)
    out, _ = run(ours, x)
    assert torch.equal(out, ours.proj.get_base_layer()(x).detach())
    grads = assert_same(model, ours, x)
    assert not any("gralora" in n for n in grads)  # PEFT freezes a disabled adapter
    for m in (model, ours):
        m.proj.enable_adapters(True)
        m.proj.merge()
    assert ours.proj.merged
    assert_same(model, ours, x)
    for m in (model, ours):  # disabling a merged layer unmerges it, as in PEFT
        m.proj.enable_adapters(False)
    assert_same(model, ours, x)
    assert not ours.proj.merged


@pytest.mark.parametrize("hybrid_r", [0, 4])
def test_bf16(hybrid_r):
    model, ours = peft_and_ours(k=2, hybrid_r=hybrid_r, dtype=torch.bfloat16)
    assert_same(model, ours, torch.randn(2, 7, 64, dtype=torch.bfloat16), tol=1e-2)


def test_bf16_base_with_fp32_adapter():
    model, ours = peft_and_ours(k=2, hybrid_r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert_same(model, ours, torch.randn(2, 7, 64, dtype=torch.bfloat16), tol=1e-2)


def test_no_grad_inference_mode_and_frozen_input():
    model, ours = peft_and_ours(k=2, hybrid_r=4)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        ref = model(x)
    with torch.inference_mode():
        assert rel(ours(x), ref) <= 1e-6
    base = ours.proj.get_base_layer()
    base.weight.requires_grad_(True)  # a trainable base weight still gets its gradient through the in-place update
    ref_grad = torch.autograd.grad(base(x).sum(), base.weight)[0]
    ours(x).sum().backward()  # input without grad, as the first adapted layer sees it
    assert ours.proj.gralora_A["default"].grad is not None
    assert torch.allclose(base.weight.grad, ref_grad)


class Checkpointed(nn.Module):
    def __init__(self, inner, use_reentrant):
        super().__init__()
        self.inner, self.use_reentrant = inner, use_reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant):
    """The trainer's gradient checkpointing re-runs the forward in backward: same gradients."""
    _, ours = peft_and_ours(k=2, hybrid_r=4)
    x = torch.randn(2, 7, 64)
    out_ref, grads_ref = run(ours, x)
    ours.zero_grad(set_to_none=True)
    out, grads = run(Checkpointed(ours, use_reentrant), x)
    assert rel(out, out_ref) <= 1e-6
    assert {n.removeprefix("inner."): g for n, g in grads.items()}.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert rel(grad, grads_ref[name.removeprefix("inner.")]) <= 1e-6, name


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,hybrid_r", [(1, 0), (2, 0), (4, 0), (2, 4), (4, 4)])
def test_autocast_matches_peft_with_fp32_master_weights(autocast_dtype, base_dtype, k, hybrid_r):
    """Mixed-precision training: frozen base in fp32 or bf16, adapter kept in fp32, forward under
    autocast. Values and gradients within the autocast dtype's tolerance of PEFT's autocast path;
    gradients reach the parameters in fp32; the output keeps the base Linear's (autocast) dtype."""
    model, ours = peft_and_ours(k=k, hybrid_r=hybrid_r, dtype=base_dtype, adapter_dtype=torch.float32)
    x = torch.randn(2, 7, 64, dtype=base_dtype)
    out_ref, grads_ref = run(model, x, autocast=autocast_dtype)
    out, grads = run(ours, x, autocast=autocast_dtype)
    assert out.dtype == autocast_dtype  # as nn.Linear and PEFT's LoRA under autocast
    assert rel(out, out_ref) <= 1e-2
    assert grads.keys() == grads_ref.keys()
    names = {n.split(".")[1] for n in grads if "gralora" in n}
    assert {"gralora_A", "gralora_B"} <= names and (not hybrid_r or "gralora_A_general" in names)
    for name, grad in grads.items():
        ref = grads_ref[name]
        assert grad.dtype == ref.dtype, name  # fp32 for the adapter, the input's dtype for x
        assert rel(grad, ref) <= 2e-2, (name, rel(grad, ref))


@pytest.mark.parametrize("hybrid_r", [0, 4])
def test_autocast_dropout_same_seed(hybrid_r):
    model, ours = peft_and_ours(k=2, hybrid_r=hybrid_r, dropout=0.3, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    model.train(), ours.train()
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    out_ref, grads_ref = run(model, x, seed=3, autocast=torch.bfloat16)
    out, grads = run(ours, x, seed=3, autocast=torch.bfloat16)
    assert rel(out, out_ref) <= 1e-2
    for name in grads_ref:
        assert rel(grads[name], grads_ref[name]) <= 2e-2, name


def test_autocast_disabled_adapter_and_merged_match_peft():
    model, ours = peft_and_ours(k=2, hybrid_r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    for m in (model, ours):
        m.proj.enable_adapters(False)
    out_ref, _ = run(model, x, autocast=torch.bfloat16)
    out, _ = run(ours, x, autocast=torch.bfloat16)
    assert torch.equal(out, out_ref)


def test_autocast_gradient_checkpointing():
    """Checkpointing re-runs the forward under the saved autocast state: same gradients."""
    _, ours = peft_and_ours(k=2, hybrid_r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    out_ref, grads_ref = run(ours, x, autocast=torch.bfloat16)
    ours.zero_grad(set_to_none=True)
    out, grads = run(Checkpointed(ours, use_reentrant=False), x, autocast=torch.bfloat16)
    assert torch.equal(out, out_ref)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ref[name.removeprefix("inner.")]), name
