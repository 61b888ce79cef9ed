"""torch.compile and the GraLoRA layer: dynamo captures the tiny UNet's forward, our autograd.Function
(forward and its backward body) included, as one graph with no break; and compiled forward+backward
equals eager (under compile the layer takes its out-of-place update: AOTAutograd cannot functionalize
the in-place add into a view of a dirtied input)."""

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

import gralora_diffusion as gd

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet_call():
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    unet = pipe.unet
    gd.add_gralora(unet, r=8, gralora_k=2)
    for name, p in unet.named_parameters():
        if "gralora_B" in name:  # B starts at zero: give the update (and A's gradient) something to carry
            torch.nn.init.normal_(p, std=0.02)
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 500]),
              torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen))
    added = {"time_ids": torch.randn(2, 6, generator=gen), "text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=gen)}

    def call(model):
        return model(*inputs, added_cond_kwargs=added, return_dict=False)[0]

    return unet, call


@pytest.mark.slow  # about 25 s alone, 60 s on a busy machine
def test_dynamo_captures_the_tiny_unet_with_gralora_in_one_graph():
    unet, call = tiny_unet_call()
    layers = [m for m in unet.modules() if isinstance(m, gd.GraloraLinear)]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(call)(unet)
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
    code = explained.graphs[0].code
    # under compile each GraLoRA layer traces its out-of-place update: two batched matmuls each, in the one graph
    assert code.count("torch.bmm(") == 2 * len(layers) > 0 and "autograd_function_apply(" not in code
    assert not any(isinstance(m, BaseTunerLayer) and not isinstance(m, gd.GraloraLinear) for m in unet.modules())


@pytest.mark.slow
def test_compiled_forward_and_backward_equal_eager_without_graph_breaks():
    from torch._dynamo.utils import counters

    unet, call = tiny_unet_call()
    trainable = [p for p in unet.parameters() if p.requires_grad]

    def grads(model):
        out = call(model)
        out.square().mean().backward()
        result = [out.detach()] + [p.grad.clone() for p in trainable]
        unet.zero_grad(set_to_none=True)
        return result

    eager = grads(unet)
    torch._dynamo.reset()
    counters.clear()
    compiled = grads(torch.compile(unet, backend="aot_eager"))  # AOTAutograd traces the backward too
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_torch_compile_flag_compiles_what_prepare_gets(tmp_path):
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_compiled_module

    from gralora_diffusion.train import TrainConfig
    from gralora_diffusion.train.loop import make_accelerator

    for flag in (True, False):
        cfg = TrainConfig(output_dir=str(tmp_path), report_to="none", torch_compile=flag)
        accelerator = make_accelerator(cfg)
        try:
            model = accelerator.prepare(torch.nn.Linear(4, 4))  # torch.compile is lazy: nothing compiles here
            assert is_compiled_module(model) == flag
        finally:
            AcceleratorState._reset_state()


@pytest.mark.parametrize("k, hybrid", [(1, 0), (2, 0), (4, 0), (2, 4)])
def test_out_of_place_update_equals_the_in_place_one(k, hybrid):
    """The compile path computes the same update, values and gradients, as the eager in-place one."""
    from gralora_diffusion.layer import _BlockUpdate, _block_update_out_of_place

    gen = torch.Generator().manual_seed(k + hybrid)
    M, i, r = 6, 16, 8
    o = 12 * k
    leaves = [torch.randn(*shape, generator=gen, requires_grad=True) for shape in
              [(M, k * i), (k, i, r), (k, r, o // k)] + ([(hybrid, k * i), (o, hybrid)] if hybrid else [])]
    x, A, B, *hyb = leaves
    A_g, B_g = hyb if hyb else (None, None)
    base = torch.randn(M, o, generator=gen)
    outs = []
    for update in (_BlockUpdate.apply, _block_update_out_of_place):
        out = update(base.clone(), x, A, B, A_g, B_g, 0.5, torch.float32)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        outs.append([out.detach(), *grads])
    for eager, plain in zip(*outs):
        torch.testing.assert_close(plain, eager, rtol=1e-4, atol=1e-4)  # fp32 summation order only
