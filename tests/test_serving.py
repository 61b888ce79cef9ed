"""Serving many adapters: hot-swap into a compiled pipeline (no recompilation, images equal a fresh
pipeline's, refusals change nothing), and a different adapter per image in one batch (image i equals
the image of a pipeline carrying adapter i alone)."""

import pytest
import torch
from conftest import assert_unchanged, capture, generate, randomize_gralora_B
from peft import GraloraConfig
from peft.tuners.gralora.layer import Linear as PeftGraloraLinear

import gralora_diffusion as gd
from gralora_diffusion.errors import GraloraConfigError, GraloraError
from gralora_diffusion.hotswap import pad_rank, refine_k

pytestmark = pytest.mark.usefixtures("one_thread")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # of the tiny SDXL built here


def adapter_file(folder, r=8, k=2, hybrid_r=0, text_encoder_targets="attn", unet_targets="attn", seed=1, alpha=None,
                 pipeline=None):
    pipe = gd.patch_pipeline(pipeline() if pipeline else gd.tiny_sdxl_pipeline(seed=0))
    configs = gd.add_gralora(pipe, r=r, gralora_k=k, hybrid_r=hybrid_r, alpha=alpha, unet_targets=unet_targets,
                             text_encoder_targets=text_encoder_targets, adapter_name="a")
    for i, component in enumerate(configs):
        randomize_gralora_B(getattr(pipe, component), seed=seed + i)
    return pipe.save_gralora_weights(folder, adapter_name="a")


def fresh_pipe():
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def delta(A, B, k, hybrid=None):
    """PEFT's own ΔW of a GraLoRA (A, B) (+ hybrid (A_g, B_g)) at scaling 1."""
    r, (o, i) = A.shape[2], (B.shape[2] * k, A.shape[1] * k)
    hr = 0 if hybrid is None else hybrid[0].shape[0]
    layer = PeftGraloraLinear(torch.nn.Linear(i, o), "a", "m", GraloraConfig(r=r, gralora_k=k, hybrid_r=hr, target_modules=["m"]), r=r)
    with torch.no_grad():
        layer.gralora_A["a"].copy_(A)
        layer.gralora_B["a"].copy_(B)
        if hybrid is not None:
            layer.gralora_A_general["a"].weight.copy_(hybrid[0])
            layer.gralora_B_general["a"].weight.copy_(hybrid[1])
    layer.scaling["a"] = 1.0
    return layer.get_delta_weight("a")


@pytest.mark.parametrize("k, k_to, r, rank", [(2, 2, 4, 16), (1, 2, 4, 8), (2, 4, 8, 16), (1, 4, 3, 12), (2, 8, 2, 8)])
def test_a_coarser_k_and_a_padded_rank_are_the_same_update(k, k_to, r, rank):
    """DESIGN §4b: GraLoRA (k, r) with k | k_to is GraLoRA (k_to, r·k_to/k); zero-padded rank adds nothing."""
    gen = torch.Generator().manual_seed(k + k_to + r)
    i, o = 16, 24
    A, B = torch.randn(k, i // k, r, generator=gen), torch.randn(k, r, o // k, generator=gen)
    A2, B2 = refine_k(A, B, k_to) if k != k_to else (A, B)
    assert A2.shape == (k_to, i // k_to, r * k_to // k) and B2.shape == (k_to, r * k_to // k, o // k_to)
    A3, B3 = pad_rank(A2, B2, rank)
    assert A3.shape == (k_to, i // k_to, rank)
    torch.testing.assert_close(delta(A3, B3, k_to), delta(A, B, k), rtol=0, atol=1e-5)


@pytest.mark.parametrize("b_config, gathered", [((8, 4, 0), False), ((4, 2, 2), True), ((8, 2, 0), True), ((2, 2, 4), True)])
def test_mixed_batch_rows_get_their_own_adapter_in_the_layer(b_config, gathered):
    """GraloraLinear(adapter_names=...) row i == the layer with adapter i alone; None, "__base__" and a
    name the layer lacks give the base output; runs of one adapter (adapters of another k) or the
    gathered batched product (one k, ranks and hybrid ranks padded), the hybrid branch, and torch.compile."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 24)
    layer = PeftGraloraLinear(base, "a", "m", GraloraConfig(r=4, gralora_k=2, hybrid_r=2, target_modules=["m"], init_weights=False), r=4)
    r, k, hybrid_r = b_config
    layer.update_layer("b", "m", r, GraloraConfig(r=r, gralora_k=k, hybrid_r=hybrid_r, target_modules=["m"], init_weights=False))
    layer.__class__ = gd.GraloraLinear
    layer.scaling_to_tensor("b")
    layer.set_scale("b", 0.7)
    assert layer._stackable(["a", "b"]) == gathered
    x = torch.randn(7, 5, 16, generator=gen)
    names = ["a", "a", None, "b", "__base__", "zzz", "a"]

    def alone(name):
        layer.set_adapter(name) if name in ("a", "b") else layer.set_adapter([])
        return layer(x)

    with torch.no_grad():
        expected = torch.stack([alone(name)[i] for i, name in enumerate(names)])
        torch.testing.assert_close(layer(x, adapter_names=names), expected, rtol=1e-5, atol=1e-5)  # fp32: other row counts
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, adapter_names=names), expected, rtol=1e-5, atol=1e-5)
        layer.set_scale("b", 0.3)  # the gathered factors kept from the last call must follow a new scale and new values
        layer.gralora_B["a"].mul_(2)
        expected = torch.stack([alone(name)[i] for i, name in enumerate(names)])
        torch.testing.assert_close(layer(x, adapter_names=names), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x, adapter_names=names), expected, rtol=1e-5, atol=1e-5)  # with grad on: per group
    with pytest.raises(ValueError, match="3 adapter names for a batch of 7"):
        layer(x, adapter_names=["a", "b", None])


def test_scaling_in_a_tensor_changes_in_place():
    """After hot-swap is on, every strength change fills the one scaling tensor a compiled graph reads."""
    layer = PeftGraloraLinear(torch.nn.Linear(8, 8), "a", "m", GraloraConfig(r=4, gralora_k=2, alpha=8, target_modules=["m"]), r=4)
    layer.__class__ = gd.GraloraLinear
    layer.scaling_to_tensor("a")
    tensor = layer.scaling["a"]
    layer.set_scale("a", 0.5)
    layer.scale_layer(3.0)
    assert layer.scaling["a"] is tensor and float(tensor) == pytest.approx(2 * 0.5 * 3.0)
    layer.unscale_layer()
    assert layer.scaling["a"] is tensor and float(tensor) == 2.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    made = {r: adapter_file(tmp / f"r{r}", r=r, seed=10 * r) for r in (4, 8, 16)}
    made["k1"] = adapter_file(tmp / "k1", r=4, k=1, alpha=3.0, seed=7)  # k=1 divides k=2: accepted, rank 4·2 = 8
    return made


@pytest.mark.slow  # ~40 s: compiling three models with dynamo, even with the eager backend, on 1 thread
def test_hotswap_under_compile_never_recompiles_and_matches_a_fresh_pipeline(files):
    from torch._dynamo.utils import counters

    expected = {}
    for name, path in files.items():
        pipe = fresh_pipe()
        pipe.load_gralora_weights(path, adapter_name="x")
        expected[name] = generate(pipe, steps=1)
    pipe = fresh_pipe()
    pipe.enable_gralora_hotswap(target_rank=16)
    pipe.load_gralora_weights(files[4], adapter_name="x")
    torch._dynamo.reset()
    counters.clear()
    for component in COMPONENTS:
        getattr(pipe, component).compile(backend="eager")
    torch.testing.assert_close(generate(pipe, steps=1), expected[4], rtol=0, atol=1e-5)
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["ok"]
    assert graphs >= 3  # the counter is live: the first call compiled every model
    for name in (8, 16, 4, "k1", 16, 8, 4, "k1", 8, 16):
        pipe.load_gralora_weights(files[name], adapter_name="x", hotswap=True)
        torch.testing.assert_close(generate(pipe, steps=1), expected[name], rtol=0, atol=1e-5)
    pipe.set_gralora_adapters(["x"], [0.5])  # a weight is a tensor fill too
    half = generate(pipe, steps=1)
    assert counters["stats"]["unique_graphs"] == graphs and counters["frames"]["ok"] == frames, dict(counters["stats"])
    reference = fresh_pipe()
    reference.load_gralora_weights(files[16], adapter_name="x")
    reference.set_gralora_adapters(["x"], [0.5])
    torch.testing.assert_close(half, generate(reference, steps=1), rtol=0, atol=1e-5)


def test_refused_swaps_change_nothing(files, tmp_path):
    pipe = fresh_pipe()
    pipe.enable_gralora_hotswap(target_rank=16)
    pipe.load_gralora_weights(files[8], adapter_name="x")
    before, images = capture(pipe), generate(pipe, steps=1)
    bad = {
        "gralora_k=4 cannot take the place of k=2": adapter_file(tmp_path / "k4", r=8, k=4),
        "rank 32 is above the loaded adapter's rank 16": adapter_file(tmp_path / "r32", r=32),
        "hybrid_r=2 is above the loaded adapter's hybrid_r=0": adapter_file(tmp_path / "hybrid", r=8, hybrid_r=2),
        "targets other modules": adapter_file(tmp_path / "ff", r=8, unet_targets="attn+ff"),
        "hot-swap keeps the components": adapter_file(tmp_path / "unet", r=8, text_encoder_targets=None),
    }
    for message, path in bad.items():
        with pytest.raises(GraloraError, match=message) as err:
            pipe.load_gralora_weights(path, adapter_name="x", hotswap=True)
        assert "\n" not in str(err.value)
    with pytest.raises(GraloraConfigError, match="is not one"):
        pipe.load_gralora_weights(files[4], adapter_name="y", hotswap=True)
    with pytest.raises(GraloraConfigError, match="before the\\s+first load"):
        pipe.enable_gralora_hotswap(target_rank=32)
    assert_unchanged(pipe, before)
    assert (generate(pipe, steps=1) == images).all()
    with pytest.raises(GraloraConfigError, match="target_rank=6 is not a multiple of gralora_k=4"):
        other = fresh_pipe()
        other.enable_gralora_hotswap(target_rank=6)
        other.load_gralora_weights(bad["gralora_k=4 cannot take the place of k=2"])


def test_tensor_scalings_fuse_scale_and_unfuse_like_floats(files):
    """After enable_gralora_hotswap the scalings are tensors; fusing, per-call scale and unfusing act as on floats."""
    from conftest import outputs

    plain, swappable = fresh_pipe(), fresh_pipe()
    swappable.enable_gralora_hotswap(target_rank=16)
    for pipe in (plain, swappable):
        pipe.load_gralora_weights(files[8], adapter_name="x")
    layer = next(m for m in swappable.unet.modules() if isinstance(m, gd.GraloraLinear))
    assert isinstance(layer.scaling["x"], torch.Tensor) and layer.r["x"] == 16
    torch.testing.assert_close(outputs(swappable), outputs(plain), rtol=0, atol=1e-5)
    before = outputs(swappable)
    for pipe in (plain, swappable):
        pipe.fuse_gralora(gralora_scale=0.5)
    torch.testing.assert_close(outputs(swappable), outputs(plain), rtol=0, atol=1e-5)
    swappable.unfuse_gralora()
    assert float(layer.scaling["x"]) == layer.base_scaling("x")
    torch.testing.assert_close(outputs(swappable), before, rtol=0, atol=1e-6)


def test_plain_lora_files_hotswap_through_diffusers(tmp_path):
    """The LoRA baseline's files (UNet weights) go through diffusers' own hotswap after enable_gralora_hotswap."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from gralora_diffusion.any_adapter import load_any_adapter

    paths = {}
    for r in (4, 8):
        plain = gd.tiny_sdxl_pipeline(seed=0)
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["to_q", "to_v"], init_lora_weights=False), plain.unet, "x")
        plain.save_lora_weights(tmp_path / f"lora{r}", unet_lora_layers=get_peft_model_state_dict(plain.unet, adapter_name="x"))
        paths[r] = tmp_path / f"lora{r}" / "pytorch_lora_weights.safetensors"
    reference = fresh_pipe()
    load_any_adapter(reference, paths[8], "x")
    pipe = fresh_pipe()
    pipe.enable_gralora_hotswap(target_rank=8)
    assert load_any_adapter(pipe, paths[4], "x") == "lora"
    assert load_any_adapter(pipe, paths[8], "x", hotswap=True) == "lora"
    torch.testing.assert_close(generate(pipe, steps=1), generate(reference, steps=1), rtol=0, atol=1e-5)


# -- per-image adapters ---------------------------------------------------------------------------


def check_mixed_batch(make_pipe, paths, num_images_per_prompt=2):
    """Image i of one mixed call == image i of the same call on a pipeline carrying only adapter i."""
    prompts = ["a photo of sks cat", "a red ball", "a house"][: len(paths)]
    names = list(paths)

    def call(pipe, **kwargs):
        return pipe(prompts, negative_prompt=["ugly", "blurry", "dark"][: len(paths)], num_inference_steps=2, height=64,
                    width=64, guidance_scale=5.0, num_images_per_prompt=num_images_per_prompt,
                    generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images

    expected = {}
    for name, path in paths.items():
        pipe = gd.patch_pipeline(make_pipe())
        pipe.set_progress_bar_config(disable=True)
        if path is not None:
            pipe.load_gralora_weights(path, adapter_name=name)
        expected[name] = call(pipe)
    pipe = gd.patch_pipeline(make_pipe())
    pipe.set_progress_bar_config(disable=True)
    for name, path in paths.items():
        if path is not None:
            pipe.load_gralora_weights(path, adapter_name=name)
    mixed = call(pipe, gralora_adapter_names=[n if paths[n] is not None else None for n in names])
    n = num_images_per_prompt
    for i, name in enumerate(names):
        rows = slice(i * n, (i + 1) * n)
        torch.testing.assert_close(torch.from_numpy(mixed[rows]), torch.from_numpy(expected[name][rows]), rtol=0, atol=1e-5)
        others = [m for m in names if m != name]
        assert all(abs(mixed[rows] - expected[m][rows]).max() > 1e-3 for m in others)  # the adapters do differ
    return pipe


@pytest.mark.slow  # ~30 s: four tiny pipelines, 2 steps, 6 images each
def test_mixed_batch_on_the_tiny_pipeline(tmp_path):
    paths = {"cat": adapter_file(tmp_path / "cat", r=8, hybrid_r=2, seed=1),  # UNet and both text encoders
             "dog": adapter_file(tmp_path / "dog", r=4, k=1, text_encoder_targets=None, seed=5),  # UNet only
             "base": None}
    pipe = check_mixed_batch(lambda: gd.tiny_sdxl_pipeline(seed=0), paths)
    before = capture(pipe)
    with pytest.raises(GraloraConfigError, match="2 names for 3 prompts"):
        pipe(["a", "b", "c"], gralora_adapter_names=["cat", None], num_inference_steps=1)
    with pytest.raises(GraloraConfigError, match="No GraLoRA adapter"):
        pipe(["a"], gralora_adapter_names=["nope"], num_inference_steps=1)
    pipe.fuse_gralora(adapter_names=["cat"])
    with pytest.raises(GraloraConfigError, match="fused"):
        pipe(["a"], gralora_adapter_names=["dog"], num_inference_steps=1)
    pipe.unfuse_gralora()
    assert_unchanged(pipe, before)  # no hook, no active-adapter change left behind


@pytest.mark.slow
def test_mixed_batch_on_the_world_pipeline(tmp_path):
    paths = {"a": adapter_file(tmp_path / "a", r=8, seed=3, pipeline=gd.tiny_world_pipeline),
             "b": adapter_file(tmp_path / "b", r=4, text_encoder_targets=None, seed=9, pipeline=gd.tiny_world_pipeline),
             "none": None}
    check_mixed_batch(gd.tiny_world_pipeline, paths, num_images_per_prompt=1)


# -- command line ---------------------------------------------------------------------------------


def test_prompts_file_adapter_column_and_pairing():
    from gralora_diffusion.generate import prompt_adapters

    adapters = ["runs/cat.safetensors:0.8", "runs/dog"]
    assert prompt_adapters(["a", "b"], adapters, False) == (["a", "b"], None)
    assert prompt_adapters(["a", "b"], adapters, True) == (["a", "b"], [0, 1])
    assert prompt_adapters(["a cat\t1", "a dog\truns/dog", "a house\tnone"], adapters, False) == (
        ["a cat", "a dog", "a house"], [0, 1, None])
    for prompts, pair, message in ((["a"], True, "1 prompts and 2 adapters"), (["a\t3"], False, "not one of the --adapter"),
                                   (["a\t1", "b"], False, "no adapter in its column")):
        with pytest.raises(GraloraConfigError, match=message):
            prompt_adapters(prompts, adapters, pair)


@pytest.mark.slow  # ~25 s: three generate runs on the tiny pipeline
def test_generate_per_image_adapters_equals_each_adapter_alone(tmp_path):
    import numpy as np
    from PIL import Image

    from gralora_diffusion.cli import main as cli_main

    cat = adapter_file(tmp_path / "cat", r=8, seed=1)
    dog = adapter_file(tmp_path / "dog", r=4, text_encoder_targets=None, seed=5)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of sks cat\t1\na dog\t{dog}\na house\tnone\n")
    common = ["generate", "--base", "tiny", "--steps", "2", "--seeds", "0,3"]
    assert cli_main([*common, "--adapter", str(cat), "--adapter", str(dog), "--prompts-file", str(prompts),
                     "--output-dir", str(tmp_path / "mixed")]) == 0
    mixed = sorted((tmp_path / "mixed").glob("0*.png"))
    assert len(mixed) == 6
    for i, (prompt, adapter) in enumerate([("a photo of sks cat", cat), ("a dog", dog), ("a house", None)]):
        out = tmp_path / f"alone{i}"
        assert cli_main([*common, "--prompt", prompt, *(["--adapter", str(adapter)] if adapter else []), "--output-dir", str(out)]) == 0
        for seed, alone in zip((0, 3), sorted(out.glob("0*.png"))):
            a = np.asarray(Image.open(alone)).astype(int)
            b = np.asarray(Image.open(mixed[2 * i + (seed == 3)])).astype(int)
            assert np.abs(a - b).max() <= 1, (prompt, seed)  # uint8 PNGs; batch rounding may flip one level
    assert cli_main([*common, "--adapter", str(cat), "--prompt", "a", "--prompt", "b", "--per_image_adapters",
                     "--output-dir", str(tmp_path / "bad")]) == 2
