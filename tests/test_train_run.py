"""Short training runs on the tiny SDXL, in this process: the loss goes down, the saved adapter
reproduces the trained pipeline, LoRA output loads with stock diffusers, caching does not change
the losses, a resumed run equals an uninterrupted one, prior preservation, NaN, checkpoint limits."""

from pathlib import Path

import pytest
import torch
from conftest import PROMPT, SAMPLES, generate
from peft import get_peft_model_state_dict

import gralora_diffusion as gd
from gralora_diffusion.constants import WEIGHT_NAME
from gralora_diffusion.adapter_file import read_adapter_file
from gralora_diffusion.tiny import TINY_MODEL_ID
from gralora_diffusion.train import TrainConfig, TrainingError, train
from gralora_diffusion.loader import patch_pipeline
from gralora_diffusion.train import loop, loss

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, name="out", on_step=None, **kw):
    settings = dict(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                    output_dir=str(tmp_path / name), resolution=64, train_batch_size=1, max_train_steps=4,
                    learning_rate=1e-3, rank=8, seed=0, report_to="none", checkpointing_steps=1000)
    cfg = TrainConfig(**{**settings, **kw})
    return train(cfg, pipeline=gd.tiny_sdxl_pipeline(seed=0), on_step=on_step)


def unet_adapter(result):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(result.components["unet"]).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("trained")
    return run(tmp, max_train_steps=60, train_batch_size=2, learning_rate=3e-3, random_flip=True,
               validation_prompt=PROMPT, num_validation_images=2, num_inference_steps=2)


def test_loss_goes_down_and_the_output_changes(trained):
    losses = trained.losses
    assert len(losses) == 60
    assert sum(losses[-15:]) / 15 < 0.9 * sum(losses[:15]) / 15
    after = generate(trained.pipeline)
    before = generate(gd.tiny_sdxl_pipeline(seed=0))
    assert abs(after - before).mean() > 1e-3
    assert trained.grid_path.is_file() and trained.grid_path.name == "final-grid.png"
    assert (trained.output_dir / "training_config.yaml").is_file()


def test_saved_adapter_reproduces_the_trained_pipeline(trained):
    adapter = read_adapter_file(trained.weights_path)
    assert trained.weights_path.name == WEIGHT_NAME
    assert adapter.metadata["base_model"] == TINY_MODEL_ID and adapter.metadata["instance_prompt"] == PROMPT
    loaded = patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    loaded.load_gralora_weights(str(trained.weights_path))
    assert torch.allclose(torch.from_numpy(generate(loaded)), torch.from_numpy(generate(trained.pipeline)), atol=1e-5)


def test_lora_baseline_loads_with_stock_load_lora_weights(tmp_path):
    result = run(tmp_path, adapter="lora", max_train_steps=3, train_text_encoder=True, learning_rate=1e-2)
    assert result.weights_path.name == "pytorch_lora_weights.safetensors"
    fresh = gd.tiny_sdxl_pipeline(seed=0)
    fresh.load_lora_weights(str(result.output_dir))
    assert torch.allclose(torch.from_numpy(generate(fresh)), torch.from_numpy(generate(result.pipeline)), atol=1e-5)
    assert abs(generate(fresh) - generate(gd.tiny_sdxl_pipeline(seed=0))).max() > 0


def test_caching_gives_the_same_losses(tmp_path):
    cached = run(tmp_path, "cached", max_train_steps=8, cache_latents=True, cache_text_embeddings=True, random_flip=True)
    plain = run(tmp_path, "plain", max_train_steps=8, cache_latents=False, cache_text_embeddings=False, random_flip=True)
    assert torch.allclose(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-6)


class Killed(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    settings = dict(max_train_steps=7, checkpointing_steps=2, gradient_accumulation_steps=2, random_flip=True,
                    lr_scheduler="cosine", lr_warmup_steps=2)
    whole = run(tmp_path, "whole", **settings)

    def kill_at_5(step, loss):
        if step == 5:  # after checkpoint-4, before checkpoint-6
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path, "parts", on_step=kill_at_5, **settings)
    (tmp_path / "parts" / ".tmp-checkpoint-6").mkdir()  # as if killed while saving checkpoint-6
    (tmp_path / "parts" / "checkpoint-9").mkdir()  # incomplete: no training_state.json, never resumed from
    resumed = run(tmp_path, "parts", resume_from_checkpoint="latest", **settings)
    assert resumed.global_step == 7 and resumed.losses == pytest.approx(whole.losses[4:], rel=1e-6)
    assert not (tmp_path / "parts" / ".tmp-checkpoint-6").exists()
    a, b = unet_adapter(whole), unet_adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prior_preservation_generates_class_images_and_splits_the_batch(tmp_path, monkeypatch):
    seen = []
    real = loss.diffusion_loss

    def spy(pred, target, timesteps, scheduler, snr_gamma=None, with_prior=False, prior_loss_weight=1.0):
        loss, parts = real(pred, target, timesteps, scheduler, snr_gamma, with_prior, prior_loss_weight)
        seen.append((pred.shape[0], with_prior, parts))
        return loss, parts

    monkeypatch.setattr(loss, "diffusion_loss", spy)
    classes = tmp_path / "class"
    common = dict(with_prior_preservation=True, class_data_dir=str(classes), class_prompt="a photo of a teapot",
                  sample_batch_size=2, num_inference_steps=2, max_train_steps=2, train_batch_size=2)
    run(tmp_path, num_class_images=3, **common)
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    kept, lost = (classes / "class-00000.png").read_bytes(), (classes / "class-00001.png").read_bytes()
    (classes / "class-00001.png").unlink()  # as if killed halfway; and one more image wanted
    run(tmp_path, num_class_images=4, overwrite_output_dir=True, **common)  # the same folder again, on purpose
    assert sorted(p.name for p in classes.iterdir())[-1] == "class-00003.png" and len(list(classes.iterdir())) == 4
    assert (classes / "class-00000.png").read_bytes() == kept and (classes / "class-00001.png").read_bytes() == lost
    # every batch: instance half then class half, both in the loss
    assert all(size % 2 == 0 and prior and parts["prior_loss"] > 0 and parts["instance_loss"] > 0 for size, prior, parts in seen)


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    def poison(step, loss):
        if step == 2:
            for p in trainable:
                p.data.fill_(float("nan"))

    trainable = []
    real_add = loop.add_adapters

    def remember(cfg, pipe, family):
        components = real_add(cfg, pipe, family)
        trainable.extend(p for m in components.values() for p in m.parameters() if p.requires_grad)
        return components

    loop.add_adapters, saved = remember, loop.add_adapters
    try:
        with pytest.raises(TrainingError, match=r"step 3\..*checkpoint-2"):
            run(tmp_path, max_train_steps=5, checkpointing_steps=2, on_step=poison)
    finally:
        loop.add_adapters = saved


def test_checkpoint_limit_keeps_the_newest_and_leaves_no_temp_folders(tmp_path):
    result = run(tmp_path, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=1)
    assert sorted(p.name for p in result.output_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert (result.output_dir / "checkpoint-3" / "adapter_unet.safetensors").is_file()
    assert not (result.output_dir / "checkpoint-3" / "model.safetensors").exists()  # adapter only, no base model


def test_every_option_runs(tmp_path):
    result = run(tmp_path, max_train_steps=2, train_batch_size=2, use_ema=True, snr_gamma=5.0, noise_offset=0.05,
                 gradient_checkpointing=True, train_text_encoder=True, text_encoder_targets="attn+mlp",
                 aspect_buckets="auto", hybrid_r=2, unet_targets="attn+ff", lr_scheduler="linear",
                 validation_prompt="a | b", num_validation_images=1, validation_steps=1, num_inference_steps=2,
                 report_to="tensorboard")
    adapter = read_adapter_file(result.weights_path)
    assert set(adapter.configs) == {"unet", "text_encoder", "text_encoder_2"} and adapter.configs["unet"]["hybrid_r"] == 2
    assert (result.output_dir / "samples" / "step-1-grid.png").is_file()
    assert any((result.output_dir / "logs").rglob("events.out.tfevents*"))


def test_model_card_is_written_and_push_to_hub_is_called(tmp_path, monkeypatch):
    import gralora_diffusion.hub as hub

    pushed = []
    monkeypatch.setattr(hub, "push_to_hub", lambda folder, repo_id, **kw: pushed.append((Path(folder), repo_id)))
    result = run(tmp_path, max_train_steps=1, push_to_hub=True, hub_model_id="me/teapot",
                 validation_prompt=PROMPT, num_validation_images=2, num_inference_steps=2)
    card = (result.output_dir / "README.md").read_text()
    assert "me/teapot" in card and "samples/final-grid.png" in card and PROMPT in card
    assert pushed == [(result.output_dir, "me/teapot")]


def test_bf16_keeps_adapter_and_vae_in_fp32(tmp_path):
    result = run(tmp_path, max_train_steps=2, train_batch_size=2, mixed_precision="bf16", train_text_encoder=True,
                 validation_prompt=PROMPT, num_validation_images=1, num_inference_steps=2)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    trainable = [p for m in result.components.values() for p in m.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # cast_training_params
    assert result.pipeline.unet.dtype == torch.bfloat16 and result.pipeline.vae.dtype == torch.float32


def test_step_benchmark_times_every_variant():
    from benchmarks.step import VARIANTS, child

    spec = {"mode": "time", "threads": None, "clock": "cpu", "dtype": "fp32", "steps": 1, "rounds": 1, "resolution": 64, "batch": 1}
    times = child(spec)
    first, failed = times.pop("first"), times.pop("failed")
    assert not failed and set(first) == set(times) and all(len(t) == 1 and t[0] > 0 for t in first.values())
    assert set(times) == set(VARIANTS) and all(len(t) == 1 and t[0] > 0 for t in times.values())
