"""Every registered base family through every command, on its tiny random pipeline (bases/<family>.py):
parametrized over the registry, so a new family is tested by adding it. README's family x feature
table lists what these tests cover."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import PROMPT, SAMPLES, SUBPROCESS_ENV, randomize_gralora_B
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gralora_diffusion as gd
from gralora_diffusion.bases import (FAMILY_NAMES, available_families, base_family, family_of_pipeline, get_family,
                                     load_base, render)
from gralora_diffusion.constants import COMPONENTS, WEIGHT_NAME
from gralora_diffusion.errors import AdapterFileError, ExportError, GraloraConfigError
from gralora_diffusion.loader import patch_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = available_families()


def image(pipe, **kwargs):
    """One 64 px image, 2 steps, as a float tensor (deterministic for the seed)."""
    import numpy as np

    return torch.from_numpy(np.asarray(render(pipe, PROMPT, 0, 2, 4.0, 64, 64, **kwargs), dtype=np.float32) / 255)


def pixels(pipe, **kwargs):
    """The same as floats before 8-bit rounding (for ≤ 1e-5 comparisons)."""
    from gralora_diffusion.bases import call_kwargs, scale_kwargs

    extra = scale_kwargs(pipe, kwargs.pop("scale")) if "scale" in kwargs else {}
    with torch.no_grad():
        out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **extra,
                   **call_kwargs(pipe, num_inference_steps=2, guidance_scale=4.0, height=64, width=64)).images
    return torch.from_numpy(out)


def adapted(family, seed=0, text=True):
    """The family's tiny pipeline with a random-acting GraLoRA adapter on its denoiser (and CLIP text encoders)."""
    fam = get_family(family)
    pipe = patch_pipeline(gd.tiny_pipeline(family, seed=seed))
    gd.add_gralora(pipe, r=4, gralora_k=2, unet_targets="attn",
                   text_encoder_targets="attn" if text and fam.trainable_text_encoders else None)
    for component in pipe.list_gralora_adapters():
        randomize_gralora_B(getattr(pipe, component), std=0.05)
    return pipe


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, adapted pipeline, its adapter file)."""
    pipe = adapted(request.param)
    path = pipe.save_gralora_weights(tmp_path_factory.mktemp(request.param))
    return request.param, pipe, path


def test_registry_is_complete():
    assert "sdxl" in FAMILIES and set(FAMILIES) <= set(FAMILY_NAMES)
    for fam in map(get_family, FAMILIES):
        assert set(fam.components) <= set(COMPONENTS), fam  # the file format's component names
        assert fam.denoiser in fam.components and set(fam.trainable_text_encoders) <= set(fam.components)
        assert all(c in fam.module.PRESETS and {"attn"} <= set(fam.presets(c)) for c in (fam.denoiser, *fam.trainable_text_encoders))
        assert fam.objective in ("ddpm", "flow")
    with pytest.raises(GraloraConfigError, match="unknown; pick one of sd15, sdxl"):
        get_family("sdxxl")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_is_the_family_and_detected_from_its_folder(family, tmp_path):
    pipe = gd.tiny_pipeline(family)
    assert family_of_pipeline(pipe).name == family
    assert get_family(family).default_resolution(pipe) == 64  # what the tiny pipeline renders without height/width
    gd.bases.save_tiny(family, tmp_path / "m")
    assert base_family(tmp_path / "m").name == family  # model_index.json's _class_name
    loaded, fam = load_base(str(tmp_path / "m"), say=None)
    assert fam.name == family and type(loaded).__name__ == get_family(family).pipeline_class_name


def test_world_is_an_sdxl_and_refuses_another_family():
    assert base_family("world").name == "sdxl" and base_family("tiny").name == "sdxl"
    other = next(f for f in FAMILIES if f != "sdxl")
    with pytest.raises(GraloraConfigError, match=f"world is a sdxl model; --family {other} does not fit"):
        base_family("world", other)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_train_steps_lower_the_loss_on_a_fixed_batch(family):
    """add_gralora + the trainer's own BatchLoss (the family's encoding, latents and objective), same noise."""
    from gralora_diffusion.train import TrainConfig
    from gralora_diffusion.train.loss import BatchLoss, training_scheduler

    fam, pipe = get_family(family), gd.tiny_pipeline(family)
    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False)
    gd.add_gralora(pipe, r=4, gralora_k=2, unet_targets="attn")
    denoiser = getattr(pipe, fam.denoiser)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    cfg = TrainConfig(cache_latents=True, cache_text_embeddings=True)
    loss_fn = BatchLoss(cfg, pipe, fam, denoiser, (), training_scheduler(pipe, fam), torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "keys": ["a", "b"], "prompts": [PROMPT, "a teapot"],
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), "with_prior": False}
    loss_fn.text_conditioning([PROMPT])  # cached alone: the batch joins rows encoded apart (of different lengths)

    def loss():
        torch.manual_seed(0)  # the same latents sample, noise and timesteps every time
        return loss_fn(batch)[0]

    optimizer = torch.optim.Adam(params, lr=1e-2)
    first = loss()
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert torch.isfinite(first) and loss().item() < 0.99 * first.item()


def test_save_then_load_into_a_fresh_pipeline_gives_the_same_images(saved):
    family, pipe, path = saved
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["family"] == family
    fresh = patch_pipeline(gd.tiny_pipeline(family))
    fresh.load_gralora_weights(str(path))
    assert (pixels(fresh) - pixels(pipe)).abs().max() <= 1e-5


def test_scale_zero_is_the_base_and_fuse_unfuse_round_trips(saved):
    family, pipe, _ = saved
    base = pixels(gd.tiny_pipeline(family))
    assert (pixels(pipe, scale=0.0) - base).abs().max() <= 1e-6
    unfused = pixels(pipe)
    assert (unfused - base).abs().max() > 1e-4  # the adapter acts
    weights = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in pipe.list_gralora_adapters()}
    pipe.fuse_gralora()
    try:
        assert (pixels(pipe) - unfused).abs().max() <= 1e-4
    finally:
        pipe.unfuse_gralora()
    for c, state in weights.items():
        assert all(torch.equal(getattr(pipe, c).state_dict()[k], v) for k, v in state.items()), c
    assert (pixels(pipe) - unfused).abs().max() <= 1e-6


def test_exact_export_loads_with_the_familys_stock_load_lora_weights(saved, tmp_path):
    family, pipe, path = saved
    report = gd.export_lora(path, tmp_path / "lora.safetensors")
    assert report.exact
    stock = gd.tiny_pipeline(family)  # diffusers' own pipeline class and loader
    stock.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert (pixels(stock) - pixels(pipe)).abs().max() <= 1e-5
    if get_family(family).kohya is None:  # kohya/ComfyUI names only where the family defines them
        with pytest.raises(ExportError, match=f"a {family} adapter; kohya/ComfyUI key names are written here for sdxl only"):
            gd.export_lora(path, tmp_path / "kohya.safetensors", format="kohya")
        assert not (tmp_path / "kohya.safetensors").exists()
    else:
        assert gd.export_lora(path, tmp_path / "kohya.safetensors", format="kohya").exact


def test_an_adapter_for_another_family_is_one_line_naming_both(saved, tmp_path):
    family, _, path = saved
    other = next(f for f in FAMILY_NAMES if f != family)
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={**header, "family": other})
    pipe = patch_pipeline(gd.tiny_pipeline(family))
    with pytest.raises(AdapterFileError, match=f"adapter for {other}, but this pipeline is {family}") as err:
        pipe.load_gralora_weights(str(tmp_path / "other.safetensors"))
    assert "\n" not in str(err.value) and not pipe.list_gralora_adapters()
    del header["family"]  # a file written before families: loads where it fits
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header)
    assert pipe.load_gralora_weights(str(tmp_path / "old.safetensors")) == "default_0"


def test_generate_info_and_evaluate_run(saved, tmp_path):
    from gralora_diffusion.evaluate import evaluate_adapter
    from gralora_diffusion.generate import generate_samples

    family, _, path = saved
    result = generate_samples("tiny", adapters=[(str(path), 1.0)], prompts=[PROMPT], output_dir=tmp_path / "gen", steps=2,
                              scales=[0.0, 1.0], height=64, width=64, progress=False, family=family)
    assert result.grid.is_file() and len(result.images) == 2 and all(p.is_file() for p in result.images)
    info = gd.adapter_info(path)
    assert info["family"] == family and set(info["components"]) <= set(get_family(family).components)
    assert f"family          {family}" in gd.format_info(info)

    def mean_pixel(images, prompts):
        return {"mean": sum(float(torch.tensor(list(i.getdata()), dtype=torch.float32).mean()) for i in images) / len(images)}

    ev = evaluate_adapter("tiny", [str(path)], prompts=[PROMPT], seeds=[0], steps=2, resolution=64, scorers=[mean_pixel],
                          output_dir=tmp_path / "ev", progress=False, family=family)
    assert [v.name for v in ev.variants] == ["base", path.parent.name] and ev.grid.is_file()
    assert ev.variants[0].metrics["mean"] != ev.variants[1].metrics["mean"]


@pytest.mark.parametrize("family", FAMILIES)
def test_train_takes_tiny_of_each_family_by_name(family, tmp_path):
    """`train --pretrained_model_name_or_path tiny --family NAME`: the trainer loads the base itself
    (bases.load_base), trains the family's denoiser and its trainable (CLIP) text encoders, and the file
    says its family; it then loads into a fresh pipeline of the family."""
    from gralora_diffusion.train import TrainConfig, train

    fam = get_family(family)
    cfg = TrainConfig(pretrained_model_name_or_path="tiny", family=family, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(tmp_path / "out"), resolution=64, train_batch_size=1, max_train_steps=2, rank=4, seed=0,
                      report_to="none", checkpointing_steps=1000, train_text_encoder=bool(fam.trainable_text_encoders))
    result = train(cfg)
    with safe_open(str(result.weights_path), "pt") as f:
        meta = f.metadata()
    assert meta["family"] == family and list(json.loads(meta["gralora_configs"])) == [fam.denoiser, *fam.trainable_text_encoders]
    assert len(result.losses) == 2 and all(map(lambda x: x == x, result.losses))
    fresh = patch_pipeline(gd.tiny_pipeline(family))
    fresh.load_gralora_weights(str(result.weights_path))
    assert set(fresh.list_gralora_adapters()) == {fam.denoiser, *fam.trainable_text_encoders}


@pytest.mark.slow
def test_make_tiny_family_and_train_world_from_the_command_line(tmp_path):
    family = FAMILIES[-1]
    run = subprocess.run([sys.executable, "-m", "gralora_diffusion.cli", "make-tiny", "--family", family, str(tmp_path / "m")],
                         capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == get_family(family).pipeline_class_name
    run = subprocess.run([sys.executable, "-m", "gralora_diffusion.cli", "train", "--pretrained_model_name_or_path", "world",
                          "--instance_data_dir", str(SAMPLES), "--instance_prompt", PROMPT, "--resolution", "64",
                          "--train_batch_size", "1", "--max_train_steps", "1", "--report_to", "none",
                          "--output_dir", str(tmp_path / "w")], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    with safe_open(str(tmp_path / "w" / WEIGHT_NAME), "pt") as f:
        assert f.metadata()["family"] == "sdxl" and f.metadata()["base_model"] == "world"


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from gralora_diffusion.tiny_scorers import save_tiny_scorers

    return [str(p) for p in save_tiny_scorers(tmp_path_factory.mktemp("scorers"))]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compare_gralora_against_lora_on_each_family(family, tmp_path, scorers):
    """`compare --pretrained_model_name_or_path tiny --family NAME`: both variants train (the LoRA baseline saved
    with the family's own save_lora_weights, read back by its load_lora_weights) and are scored."""
    from gralora_diffusion.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--pretrained_model_name_or_path", "tiny", "--family", family, "--instance_data_dir", str(SAMPLES),
                 "--instance_prompt", PROMPT, "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "2",
                 "--num_inference_steps", "2", "--report_to", "none", "--output_dir", str(out), "--dino_model", scorers[0],
                 "--clip_model", scorers[1], "--eval_seeds", "0", "--eval_prompt", PROMPT, "--num_threads", "1",
                 "--variants", "gralora:r=4,k=2", "lora:r=4"]) == 0
    entries = json.loads((out / "results.json").read_text())
    assert [e["kind"] for e in entries] == ["gralora", "lora"] and entries[0]["parameters"] == entries[1]["parameters"] > 0
    assert all(isinstance(e["metrics"]["dino"]["mean"], float) for e in entries) and (out / "grid.png").is_file()
