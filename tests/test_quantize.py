"""GraLoRA over a quantized frozen base (--quantize_base, gralora_diffusion/quantize.py): training over an
int8 base lowers the loss, moves no base weight and reaches only the adapter; adapters move between
quantized and unquantized pipelines; fuse on a quantized base is refused; images of an int8 base with the
adapter stay close to the unquantized ones; bitsandbytes NF4 under the layer, where it runs (CPU)."""

import subprocess
import sys

import pytest
import torch
from conftest import PROMPT, SAMPLES, SUBPROCESS_ENV, generate, randomize_gralora_B

import gralora_diffusion as gd
from gralora_diffusion.errors import GraloraConfigError, TrainConfigError
from gralora_diffusion.bases import load_base
from gralora_diffusion.quantize import (
    check_quantize_base,
    is_quantized_weight,
    pipeline_quantization,
    quantization_name,
    quantize_loaded,
    weight_bytes,
)
from gralora_diffusion.tiny import TINY_MODEL_ID
from gralora_diffusion.train import TrainConfig, train


def load_base_pipeline(spec, device, dtype, say=None, quantize_base="none"):
    return load_base(spec, None, device, dtype, say=say, quantize_base=quantize_base)[0]

pytestmark = pytest.mark.usefixtures("one_thread")


def base_weights(pipe) -> dict:
    """Every UNet and text-encoder weight that is not an adapter's, as stored (quantized ones by their data)."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, p in getattr(pipe, component).state_dict().items():
            if "gralora" not in name:
                t = p.qdata if hasattr(p, "qdata") else p
                out[f"{component}.{name}".replace(".base_layer", "")] = t.detach().clone()
    return out


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, one_thread):
    pipe = load_base_pipeline("tiny", "cpu", torch.float32, say=None, quantize_base="int8")
    before = base_weights(pipe)
    cfg = TrainConfig(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(tmp_path_factory.mktemp("int8") / "out"), resolution=64, train_batch_size=2,
                      max_train_steps=60, learning_rate=3e-3, rank=8, seed=0, report_to="none", checkpointing_steps=1000,
                      quantize_base="int8")
    return train(cfg, pipeline=pipe), before


def test_the_options_map_to_diffusers_configs_per_component():
    config = pipeline_quantization("int8", ("unet", "text_encoder"))
    assert type(config).__name__ == "PipelineQuantizationConfig"
    assert type(config.quant_mapping["unet"]).__module__.startswith("diffusers")
    assert type(config.quant_mapping["text_encoder"]).__module__.startswith("transformers")
    assert type(config.quant_mapping["unet"].quant_type).__name__ == "Int8WeightOnlyConfig"
    assert type(pipeline_quantization("fp8").quant_mapping["unet"].quant_type).__name__ == "Float8WeightOnlyConfig"
    assert pipeline_quantization("none") is None
    with pytest.raises(GraloraConfigError, match=r"--quantize_base 'int4': pick one of none, int8, nf4, fp8"):
        check_quantize_base("int4")
    if not torch.cuda.is_available():  # diffusers' bitsandbytes quantizer refuses a CPU-only machine
        with pytest.raises(GraloraConfigError, match="nf4: .*CUDA/XPU/MPS"):
            check_quantize_base("nf4")
        with pytest.raises(TrainConfigError, match="nf4"):
            TrainConfig(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                        quantize_base="nf4", report_to="none").validate(need_model=False)


@pytest.mark.parametrize("mode, weight_type", [("int8", "Int8Tensor"), ("fp8", "Float8Tensor")])
def test_embedded_base_is_quantized_through_diffusers_from_pretrained(mode, weight_type):
    pipe = load_base_pipeline("tiny", "cpu", torch.float32, say=None, quantize_base=mode)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component)
        assert quantization_name(model) == mode and getattr(model, "is_quantized", False)
        query = next(m for n, m in model.named_modules() if n.endswith(("to_q", "q_proj")))
        assert type(query.weight).__name__ == weight_type
    assert quantization_name(pipe.vae) == "none"
    plain = gd.tiny_sdxl_pipeline(seed=0)
    def linear_bytes(model):
        return sum(weight_bytes(m) for m in model.modules() if isinstance(m, torch.nn.Linear))

    assert linear_bytes(pipe.unet) < 0.35 * linear_bytes(plain.unet)  # fp32 -> 8 bits (+ a scale per row, biases)
    only_unet = quantize_loaded(gd.tiny_sdxl_pipeline(seed=0), pipeline_quantization(mode, ("unet",)))
    assert quantization_name(only_unet.unet) == mode and quantization_name(only_unet.text_encoder) == "none"


def test_training_over_int8_lowers_the_loss_and_leaves_the_base_bit_identical(int8_run):
    result, before = int8_run
    losses = result.losses
    assert len(losses) == 60 and sum(losses[-15:]) / 15 < 0.9 * sum(losses[:15]) / 15  # as test_train_run's fp32 run
    after = base_weights(result.pipeline)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    unet = result.components["unet"]
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("gralora" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if "gralora" in n)
    layer = next(m for n, m in unet.named_modules() if n.endswith("to_q"))
    assert type(layer).__name__ == "GraloraLinear" and is_quantized_weight(layer.base_layer.weight)


def test_adapter_trained_over_int8_loads_into_quantized_and_unquantized_pipelines(int8_run):
    result, _ = int8_run
    trained = generate(result.pipeline)
    quantized = load_base_pipeline("tiny", "cpu", torch.float32, say=None, quantize_base="int8")
    quantized.load_gralora_weights(str(result.weights_path))
    assert torch.allclose(torch.from_numpy(generate(quantized)), torch.from_numpy(trained), atol=1e-5)
    plain = load_base_pipeline("tiny", "cpu", torch.float32, say=None)
    plain.load_gralora_weights(str(result.weights_path))
    base = generate(load_base_pipeline("tiny", "cpu", torch.float32, say=None))
    image = generate(plain)
    assert abs(image - base).mean() > 1e-3  # the adapter acts on the unquantized base too


def test_fuse_on_a_quantized_base_is_refused_and_changes_nothing(int8_run):
    result, _ = int8_run
    pipe = result.pipeline
    before = generate(pipe)
    weights = base_weights(pipe)
    with pytest.raises(GraloraConfigError, match=r"unet\..*to_q: the base weight is quantized \(Int8Tensor\).*Nothing was fused"):
        pipe.fuse_gralora()
    assert not any(layer.merged for layer in pipe._all_gralora_layers())
    assert all(torch.equal(weights[k], v) for k, v in base_weights(pipe).items())
    assert torch.equal(torch.from_numpy(generate(pipe)), torch.from_numpy(before))


def test_int8_world_with_an_adapter_stays_close_to_unquantized():
    """The world model with a random adapter (same seed), 64 px, 4 steps, pixels in [0, 1]: int8 (weight-only,
    per row) against fp32. Measured here: mean |diff| 0.0012, max 0.012, against the adapter's own effect of
    0.028 (fp8 weight-only: 0.016 / 0.15, not bounded here)."""
    images = {}
    for mode in ("none", "int8"):
        pipe = load_base_pipeline("world", "cpu", torch.float32, say=None, quantize_base=mode)
        images[mode, "base"] = generate(pipe, "a photo of a red ball", steps=4)
        torch.manual_seed(0)  # the same A on both
        gd.add_gralora(pipe, r=8, gralora_k=2, text_encoder_targets="attn")
        for component in ("unet", "text_encoder", "text_encoder_2"):
            randomize_gralora_B(getattr(pipe, component), std=0.02)
        images[mode] = generate(pipe, "a photo of a red ball", steps=4)
    diff = abs(images["int8"] - images["none"])
    effect = abs(images["none"] - images["none", "base"]).mean()
    print(f"int8 vs fp32 world images with an adapter: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}; "
          f"the adapter's effect {effect:.4f}")
    assert 0 < diff.mean() < 0.005 and diff.max() < 0.05  # > 0: quantization did happen
    assert diff.mean() < 0.25 * effect


def test_gralora_over_bitsandbytes_nf4_linear_on_cpu():
    """diffusers will not quantize with bitsandbytes on CPU, but bitsandbytes' Linear4bit runs here: the layer
    takes its base output from Linear4bit's forward and trains the adapter only."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 32)
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(plain.state_dict())
    layer = layer.to("cpu")  # quantizes
    model = torch.nn.Sequential()
    model.add_module("proj", layer)
    model.requires_grad_(False)
    gd.add_gralora(model, r=8, gralora_k=2, unet_targets=["proj"])
    adapted = model.proj
    assert type(adapted).__name__ == "GraloraLinear" and type(adapted.base_layer.weight).__name__ == "Params4bit"
    x = torch.randn(5, 64, requires_grad=True)
    assert torch.equal(adapted(x), layer(x))  # B = 0: exactly the quantized layer's output
    randomize_gralora_B(model)
    y = adapted(x)
    y.square().mean().backward()
    assert x.grad is not None and adapted.gralora_A["default"].grad is not None
    assert abs(y - plain(x)).mean() > 0  # the adapter acts
    with pytest.raises(GraloraConfigError, match="quantized \\(Params4bit\\)"):
        from gralora_diffusion.quantize import check_fusable

        check_fusable(adapted, "proj")


@pytest.mark.slow
def test_cli_generate_with_int8_base_and_help_lists_the_option(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gralora_diffusion.cli", "generate", "--base", "tiny", "--quantize_base", "int8",
                          "--steps", "1", "--prompt", "a red ball", "--output-dir", str(tmp_path / "g")], capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Loading base model tiny (int8)" in out.stdout and "Failed to load" not in out.stdout + out.stderr
    assert "Enum subclass" not in out.stderr
    bad = subprocess.run([sys.executable, "-m", "gralora_diffusion.cli", "generate", "--quantize_base", "int4"],
                         capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert bad.returncode == 2 and "--quantize_base" in bad.stderr
