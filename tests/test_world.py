"""The tiny world: renderer, shipped world model, evaluator, and the quickstart's fidelity rise."""

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import gralora_diffusion as gd
from gralora_diffusion.world.draw import BACKGROUNDS, COLOURS, HELD_OUT, OBJECTS, caption, render, render_batch, triples
from gralora_diffusion.world.evaluator import WorldEvaluator, held_out_accuracy
from gralora_diffusion.world.measure import generate


@pytest.fixture(scope="module")
def world():
    return gd.tiny_world_pipeline()


@pytest.fixture(scope="module")
def evaluator():
    return WorldEvaluator.load()


def test_world_is_deterministic_and_has_no_red_teapot():
    a, b = render_batch(7, 0, 50), render_batch(7, 0, 50)
    assert np.array_equal(a[0], b[0]) and a[2] == b[2]
    assert not np.array_equal(a[0], render_batch(8, 0, 50)[0])
    assert len(OBJECTS) >= 8 and len(COLOURS) >= 8 and len(BACKGROUNDS) >= 5
    assert not any(o == "teapot" and c == "red" for o, c, _ in triples())
    with pytest.raises(ValueError, match="no red teapot"):
        render(0, 3, "teapot", "red")
    assert caption("ball", "red", "stripes") == "a photo of a red ball on green stripes"
    assert len(HELD_OUT) == 40 and HELD_OUT <= set(triples())


def test_evaluator_reads_held_out_renders(evaluator):
    accuracy = held_out_accuracy(evaluator, count=250)
    assert min(accuracy.values()) >= 0.95, accuracy
    assert evaluator.embed([render(5, 0)[0]]).shape == (1, 128)


def test_world_pipeline_follows_prompts(world, evaluator):
    assert isinstance(world, StableDiffusionXLPipeline) and world.unet.config.addition_embed_type == "text_time"
    assert world.vae_scale_factor == 8 and world.text_encoder_2.config.projection_dim > 0
    wanted = [("ball", "red", "sky"), ("cube", "blue", "table"), ("star", "yellow", "checks"), ("ring", "green", "plain")]
    prompts = [caption(*w) for w in wanted for _ in range(2)]
    images = generate(world, prompts, [0, 1] * len(wanted), steps=20)
    predicted = evaluator.predict(images)
    hits = {k: sum(p[k] == w[i] for p, w in zip(predicted, [w for w in wanted for _ in range(2)]))
            for i, k in enumerate(("object", "colour", "background"))}
    assert hits["colour"] >= 5 and hits["background"] >= 6 and hits["object"] >= 5, (hits, predicted)  # random: ~1 of 8


def test_world_pipeline_is_deterministic(world):
    a = world("a photo of a red ball", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = world("a photo of a red ball", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b)


def test_make_tiny_world_and_generate_base_world(tmp_path, capsys):
    from gralora_diffusion.cli import main

    assert main(["make-tiny", "--world", str(tmp_path / "w")]) == 0
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "w")
    assert loaded.unet.config.block_out_channels == list(gd.tiny_world_pipeline().unet.config.block_out_channels)
    result = gd.generate_samples(base_model="world", prompts=["a photo of a red ball"], output_dir=tmp_path / "g", steps=2)
    assert result.grid.is_file() and len(result.images) == 1


@pytest.mark.slow
def test_quickstart_learns_the_teapot(tmp_path, capsys):
    """The README's main command on the world model: subject fidelity rises clearly, outputs where they
    were, and it says where they are and what to run next. (The console script itself runs in test_wheel.)"""
    from gralora_diffusion.cli import main

    assert main(["quickstart", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"subject fidelity .*: ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert after > before + 0.05, out
    assert (tmp_path / "pytorch_gralora_weights.safetensors").is_file() and (tmp_path / "before_after.png").is_file()
    assert (tmp_path / "samples" / "final-grid.png").is_file()
    assert not (tmp_path / "tiny-sdxl").exists()  # the trainer takes `world` itself: nothing saved just to pass a folder
    assert "Next:" in out and "pytorch_gralora_weights.safetensors" in out  # where the files are, what to run next


def test_world_scorer_reads_what_each_prompt_asks_for():
    """evaluate/compare's world scorer: fidelity on the subject's prompts only, the background where a
    prompt names one, the prior's object and colour; checked on renders whose answers are known."""
    from gralora_diffusion.evaluate import BASE_SCORERS
    from gralora_diffusion.world.draw import render
    from gralora_diffusion.world.scorers import WorldScorer, requested, world_scorers

    assert BASE_SCORERS["world"] == "gralora_diffusion.world.scorers:world_scorers"
    assert requested("a photo of sks teapot on green stripes") == {"background": "stripes", "object": "teapot"}
    assert requested("a photo of a blue ball") == {"object": "ball", "colour": "blue"}
    teapots = [render(1, i, "teapot", "green", "checks")[0] for i in range(3)]
    balls = [render(2, i, "ball", "blue", "table")[0] for i in range(2)]
    scorer = world_scorers(teapots)[0]
    assert isinstance(scorer, WorldScorer)
    scores = scorer(teapots + balls, ["a photo of sks teapot on checks"] * 3 + ["a photo of a blue ball"] * 2)
    assert scores["world_background"] == 1.0 and scores["world_prior"] == 1.0
    assert scores["world_fidelity"] > 0.9  # the instance images themselves
    wrong = scorer(balls, ["a photo of sks teapot on green stripes", "a photo of a red cube"])
    assert wrong["world_background"] == 0.0 and wrong["world_prior"] == 0.0 and wrong["world_fidelity"] < scores["world_fidelity"]
