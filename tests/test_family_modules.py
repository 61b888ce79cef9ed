"""The per-family modules of `gralora_diffusion.bases`, each on its real tiny pipeline: the contract's
data, the stock pipeline, `predict` against the pipeline's own denoiser call, a few GraLoRA steps
lowering the family's loss, and PEFT LoRA files under `<component>.<module>` names loading through
the family's stock `load_lora_weights`."""

import re
from importlib import import_module

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from gralora_diffusion.adapter_config import make_config
from gralora_diffusion.bases import flow
from gralora_diffusion.inject import check_config, inject_config

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["sd15", "flux", "sd3", "flux2_klein", "qwen_image"]
PROMPTS = ["a photo of sks dog", "a photo of a dog"]


def family(name):
    return import_module(f"gralora_diffusion.bases.{name}")


# How each pipeline takes `latents=`, how its denoiser's output is laid out (from `predict`'s
# unpacked layout), and the call arguments that make it run the denoiser once per step on the prompt
# alone (no classifier-free guidance batch).
def pipeline_latents(name, pipe, x):
    if name == "flux":
        return pipe._pack_latents(x, *x.shape)
    if name == "qwen_image":  # (batch, channels, frame, height, width)
        return pipe._pack_latents(x, *x.shape[:2], *x.shape[3:])
    return x


def denoiser_layout(name, pipe, x):
    if name == "flux2_klein":
        return pipe._pack_latents(x)
    return pipeline_latents(name, pipe, x)


CALL_KWARGS = {"sd15": dict(guidance_scale=1.0), "flux": {}, "sd3": dict(guidance_scale=1.0), "flux2_klein": dict(guidance_scale=1.0), "qwen_image": {}}


def image(pipe, steps=2, **kwargs):
    return pipe(prompt=PROMPTS[0], num_inference_steps=steps, height=64, width=64, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def denoiser_of(name, pipe):
    return getattr(pipe, family(name).DENOISER)


@pytest.mark.parametrize("name", FAMILIES)
def test_contract_data_and_every_preset_fits_gralora_k8(name):
    fam = family(name)
    pipe = fam.build_tiny()
    assert type(pipe).__name__ == fam.PIPELINE_CLASS
    assert set(fam.PRESETS) == set(type(pipe)._lora_loadable_modules)
    assert fam.DENOISER in fam.PRESETS and set(fam.TRAINABLE_TEXT_ENCODERS) <= set(fam.PRESETS)
    assert fam.OBJECTIVE in ("ddpm", "flow")
    for component, presets in fam.PRESETS.items():
        model = getattr(pipe, component)
        for preset, targets in presets.items():
            matched = check_config(model, make_config(8, 8, target_modules=list(targets)), f"{name}.{component}")
            # every listed name is used somewhere (a typo would match nothing and go unnoticed); names
            # with a block index beyond the tiny model's blocks are checked at block 0
            for target in {re.sub(r"blocks\.\d+\.", "blocks.0.", t) for t in targets}:
                assert any(m == target or m.endswith("." + target) for m in matched), (component, preset, target)


@pytest.mark.parametrize("name", FAMILIES)
def test_build_tiny_runs_the_stock_pipeline_deterministically(name):
    fam = family(name)
    first = image(fam.build_tiny(seed=0))
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, image(fam.build_tiny(seed=0)))
    assert not np.array_equal(first, image(fam.build_tiny(seed=1)))


@pytest.mark.parametrize("name", FAMILIES)
def test_predict_matches_the_pipelines_own_denoiser_call(name):
    """The pipeline's first step records the denoiser's output; `predict` on the same latents, the same
    timestep and `encode_prompts`' conditioning must give it back (packing, ids, guidance, scaling)."""
    fam = family(name)
    pipe = fam.build_tiny()
    denoiser = denoiser_of(name, pipe)
    with torch.no_grad():
        latents = fam.normalize_latents(pipe, _latent_sample(fam, pipe, torch.zeros(1, 3, 64, 64)))
    x = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    seen = []
    hook = denoiser.register_forward_hook(lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out.sample))
    pipe(prompt=PROMPTS[0], num_inference_steps=2,  # 1 step: Qwen's shift_terminal divides by 0
         height=64, width=64, latents=pipeline_latents(name, pipe, x.clone()),
         output_type="latent", **CALL_KWARGS[name])
    hook.remove()
    assert len(seen) >= 2  # PNDM's warm-up calls its UNet once more
    with torch.no_grad():
        cond = fam.encode_prompts(pipe, PROMPTS[:1], "cpu")
        mine = fam.predict(pipe, denoiser, x, pipe.scheduler.timesteps[:1], cond)
    assert mine.shape == x.shape
    torch.testing.assert_close(denoiser_layout(name, pipe, mine), seen[0], rtol=1e-5, atol=1e-5)


def _latent_sample(fam, pipe, pixels):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(fam.vae_encode(pipe, pixels)).mode()


def _loss(name, pipe, denoiser, latents, cond, noise):
    """The family's objective on a fixed batch (same timesteps and noise every call); the batch's
    second half counts as the prior-preservation half."""
    fam = family(name)
    if fam.OBJECTIVE == "flow":
        scheduler = flow.training_scheduler(pipe)
        sigmas, timesteps = flow.sample_timesteps(scheduler, len(latents), getattr(fam, "WEIGHTING_SCHEME", "none"),
                                                  generator=torch.Generator().manual_seed(5))
        noisy, target = flow.noisy_and_target(latents, noise, sigmas)
        pred = fam.predict(pipe, denoiser, noisy, timesteps, cond)
        return flow.flow_loss(pred, target, sigmas, getattr(fam, "WEIGHTING_SCHEME", "none"), with_prior=True)[0]
    from diffusers import DDPMScheduler

    from gralora_diffusion.train.loss import diffusion_loss

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    timesteps = torch.tensor([300, 700])
    pred = fam.predict(pipe, denoiser, scheduler.add_noise(latents, noise, timesteps), timesteps, cond)
    return diffusion_loss(pred, noise, timesteps, scheduler, with_prior=True)[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_few_gralora_steps_lower_the_familys_loss(name):
    fam = family(name)
    pipe = fam.build_tiny()
    denoiser = denoiser_of(name, pipe)
    config = make_config(8, 2, target_modules=list(fam.PRESETS[fam.DENOISER]["attn"]))
    check_config(denoiser, config, fam.DENOISER, "default")
    inject_config(denoiser, config, "default")
    params = [p for n, p in denoiser.named_parameters() if "gralora_" in n]
    assert params and all(p.requires_grad for p in params)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = fam.normalize_latents(pipe, _latent_sample(fam, pipe, pixels))
        cond = fam.encode_prompts(pipe, PROMPTS, "cpu")
    assert all(v.shape[0] == 2 for v in cond.values())  # batch-first
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = _loss(name, pipe, denoiser, latents, cond, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize("name", FAMILIES)
def test_peft_lora_file_with_component_prefixes_loads_through_the_stock_loader(name, tmp_path):
    """`<component>.<module>.lora_A.weight` / `lora_B.weight`, for the denoiser and every trainable text
    encoder, is what the family's `load_lora_weights` reads: the loaded pipeline reproduces the one
    carrying the PEFT adapters, and differs from the base."""
    fam = family(name)
    base = image(fam.build_tiny(), **CALL_KWARGS[name])
    adapted = fam.build_tiny()
    state = {}
    for i, component in enumerate((fam.DENOISER, *fam.TRAINABLE_TEXT_ENCODERS)):
        model = getattr(adapted, component)
        preset = "attn"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4 + i)
            model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(fam.PRESETS[component][preset])))
        for n, p in model.named_parameters():  # init_lora_weights=False draws B like A; keep it moderate
            if "lora_B" in n:
                p.data.mul_(0.1 if component == fam.DENOISER else 0.5)
        state.update({f"{component}.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()})
    expected = image(adapted, **CALL_KWARGS[name])
    assert state and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in state)
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors")
    fresh = fam.build_tiny()
    fresh.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    got = image(fresh, **CALL_KWARGS[name])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - base).max() > 1e-3
    # every component took its part: dropping one changes the image
    for component in fam.TRAINABLE_TEXT_ENCODERS:
        getattr(fresh, component).disable_adapters()
        assert np.abs(image(fresh, **CALL_KWARGS[name]) - got).max() > 1e-4, component
        getattr(fresh, component).enable_adapters()


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_pipeline_survives_save_pretrained(name, tmp_path):
    """Tokenizers built offline (CLIP, T5, Qwen with its chat template) and models reload from a
    diffusers folder (what `make-tiny` writes) and give the same image."""
    import diffusers

    fam = family(name)
    pipe = fam.build_tiny()
    pipe.save_pretrained(tmp_path)
    again = getattr(diffusers, fam.PIPELINE_CLASS).from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(image(again, **CALL_KWARGS[name]), image(pipe, **CALL_KWARGS[name]), atol=1e-5)


def test_flow_objective_points_target_weights_and_prior_split():
    x, noise = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    noisy, target = flow.noisy_and_target(x, noise, sigmas)
    torch.testing.assert_close(noisy[0], x[0])
    torch.testing.assert_close(noisy[3], noise[3])
    torch.testing.assert_close(noisy[1], 0.75 * x[1] + 0.25 * noise[1])
    torch.testing.assert_close(target, noise - x)
    pred = torch.randn(4, 2, 3, 3)
    per_sample = ((pred - target) ** 2).flatten(1).mean(1)
    loss, parts = flow.flow_loss(pred, target, sigmas, "none", with_prior=True, prior_loss_weight=0.5)
    torch.testing.assert_close(parts["instance_loss"], per_sample[:2].mean())
    torch.testing.assert_close(parts["prior_loss"], per_sample[2:].mean())
    torch.testing.assert_close(loss, per_sample[:2].mean() + 0.5 * per_sample[2:].mean())
    cosmap = 2 / (np.pi * (1 - 2 * sigmas[1:] + 2 * sigmas[1:] ** 2))
    torch.testing.assert_close(flow.flow_loss(pred[1:], target[1:], sigmas[1:], "cosmap")[0], (cosmap * per_sample[1:]).mean())
    scheduler = flow.training_scheduler(family("flux").build_tiny())
    sig, t = flow.sample_timesteps(scheduler, 64, "mode", generator=torch.Generator().manual_seed(0))
    assert sig.shape == t.shape == (64,) and ((sig > 0) & (sig <= 1)).all()
    torch.testing.assert_close(t, sig * 1000)  # FLUX.1's training schedule is unshifted (dynamic shifting)
    with pytest.raises(ValueError, match="weighting_scheme='uniform'"):
        flow.sample_timesteps(scheduler, 2, "uniform")


# The pipeline of each family whose `_encode_vae_image` turns pixels into normalized training latents
# (sd3 shares flux's shift-and-scale rule; sd15 shares the trainer's SDXL rule).
IMAGE_ENCODERS = {"flux": "FluxImg2ImgPipeline", "flux2_klein": "Flux2KleinPipeline", "qwen_image": "QwenImageImg2ImgPipeline"}


@pytest.mark.parametrize("name", sorted(IMAGE_ENCODERS))
def test_latents_are_normalized_as_the_familys_pipelines_encode_images(name):
    """shift/scale, FLUX.2's patchify and batch-norm statistics, Qwen's per-channel mean/std on its frame
    axis (random statistics in the tiny VAEs, so a wrong order or axis shows)."""
    import diffusers
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    fam = family(name)
    pipe = fam.build_tiny()
    encoder = getattr(diffusers, IMAGE_ENCODERS[name])(**pipe.components)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = DiagonalGaussianDistribution(fam.vae_encode(pipe, pixels))
        raw = dist.mode() if getattr(fam, "LATENTS", "sample") == "mode" else dist.sample(torch.Generator().manual_seed(0))
        mine = fam.normalize_latents(pipe, raw)
        theirs = encoder._encode_vae_image(pixels.unsqueeze(2) if name == "qwen_image" else pixels,
                                           torch.Generator().manual_seed(0))
    torch.testing.assert_close(mine, theirs)
    assert mine.shape != raw.shape or not torch.allclose(mine, raw)  # the normalization did something


def test_qwen_rows_cached_apart_join_into_the_batchs_conditioning():
    """Qwen's prompts encode to their own lengths; rows encoded one by one and joined by `concat_cond`
    (the trainer's per-prompt cache) must predict what the batch encoded at once predicts."""
    fam = family("qwen_image")
    pipe = fam.build_tiny()
    prompts = ["a dog", "a photo of a very small dog on a red sofa"]
    with torch.no_grad():
        together = fam.encode_prompts(pipe, prompts, "cpu")
        apart = fam.concat_cond([fam.encode_prompts(pipe, [p], "cpu") for p in prompts])
        assert together["prompt_embeds_mask"].sum(1).tolist() == apart["prompt_embeds_mask"].sum(1).tolist()
        assert not together["prompt_embeds_mask"].all()
        x = torch.randn(2, fam.LATENT_CHANNELS, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([200.0, 800.0])
        torch.testing.assert_close(fam.predict(pipe, pipe.transformer, x, t, apart),
                                   fam.predict(pipe, pipe.transformer, x, t, together), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in FAMILIES if family(n).TRAINABLE_TEXT_ENCODERS])
def test_encode_prompts_runs_the_trainers_text_encoders_with_gradients(name):
    """`text_encoders` (the trainer's, in TRAINABLE_TEXT_ENCODERS order) are the ones the pipeline's
    encode_prompt runs, gradients reach them, and the pipeline keeps its own afterwards."""
    import copy

    fam = family(name)
    pipe = fam.build_tiny()
    own = [getattr(pipe, c) for c in fam.TRAINABLE_TEXT_ENCODERS]
    trainers = [copy.deepcopy(m).requires_grad_(True) for m in own]
    with torch.no_grad():
        for m in trainers:
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        before = fam.encode_prompts(pipe, PROMPTS, "cpu")
    after = fam.encode_prompts(pipe, PROMPTS, "cpu", text_encoders=trainers)
    assert [getattr(pipe, c) for c in fam.TRAINABLE_TEXT_ENCODERS] == own
    assert not torch.allclose(after["prompt_embeds"], before["prompt_embeds"])
    sum(v.sum() for v in after.values()).backward()
    for m in trainers:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert all(p.grad is None for m in own for p in m.parameters())
