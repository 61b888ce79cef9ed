"""torch.compile and the GraLoRA layer: dynamo captures the tiny UNet's forward, our autograd.Function
(forward and its backward body) included, as one graph with no break; and compiled forward+backward
should equal eager (fails with the layer as on main: see the xfail reason)."""

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
    # each GraLoRA layer's autograd.Function (its forward and backward) is one node of the graph
    assert code.count("autograd_function_apply(") == len(layers) > 0
    assert not any(isinstance(m, BaseTunerLayer) and not isinstance(m, gd.GraloraLinear) for m in unet.modules())


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "layer.py on main: _BlockUpdate adds in place (baddbmm_) into a transposed view of a mark_dirty input; "
    "AOTAutograd's functionalization cannot view the result back (BackendCompilerFailed), and dynamo's captured "
    "backward fails on the 3-d result. Fix in the layer: under torch.compiler.is_compiling(), the out-of-place "
    "result + s * bmm(g, B) with plain autograd (equal to eager, inductor fuses the add)."))
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
