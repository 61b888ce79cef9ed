"""`train --select_best`: the step whose logged validation score is highest is the one kept in best/
(its adapter equals that step's checkpoint), and `--early_stop_patience` ends the run where the score
stopped improving; the score rules on known metrics."""

import json

import pytest
import torch
from safetensors.torch import load_file

import gralora_diffusion as gd
from conftest import PROMPT, SAMPLES
from gralora_diffusion.errors import TrainConfigError, TrainingError
from gralora_diffusion.tiny_scorers import save_tiny_scorers
from gralora_diffusion.train import TrainConfig, train
from gralora_diffusion.train.select import BestTracker, selection_score

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_scores_and_patience_on_known_metrics():
    assert selection_score({"validation/dino": 0.8, "validation/clip_t": 0.3}, "fidelity_x_prompt") == pytest.approx(0.24)
    world = {"world_fidelity": 0.9, "world_background": 1.0, "world_prior": 0.5}
    assert selection_score(world, "fidelity") == 0.9 and selection_score(world, "prompt") == 0.75
    with pytest.raises(TrainingError, match="no prompt score"):
        selection_score({"dino": 0.5}, "prompt")
    tracker = BestTracker("fidelity", patience=2)
    improved = [tracker.observe(step, {"dino": score}) for step, score in ((1, 0.5), (2, 0.7), (3, 0.7), (4, 0.6))]
    assert improved == [True, True, False, False]  # a tie is not an improvement
    assert tracker.best["step"] == 2 and tracker.patience_out()
    assert not BestTracker("fidelity", patience=3, history=tracker.history).patience_out()
    with pytest.raises(TrainConfigError, match="--validation_steps"):
        TrainConfig(instance_data_dir=str(SAMPLES), validation_prompt=PROMPT, select_best="fidelity").validate(need_model=False)
    with pytest.raises(TrainConfigError, match="--select_best"):
        TrainConfig(instance_data_dir=str(SAMPLES), early_stop_patience=2).validate(need_model=False)


def _config(tmp_path, scorers, **extra):
    settings = dict(pretrained_model_name_or_path="tiny", instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                    resolution=64, train_batch_size=2, max_train_steps=5, checkpointing_steps=1, learning_rate=3e-3,
                    validation_prompt=PROMPT, num_validation_images=1, validation_steps=1, num_inference_steps=2,
                    dino_model=str(scorers[0]), clip_model=str(scorers[1]), seed=0, output_dir=str(tmp_path / "run"),
                    report_to="tensorboard")
    return TrainConfig(**{**settings, **extra})


def _unet_tensors(path):
    """Adapter tensors by module and kind, whatever file they come from (final file or checkpoint)."""
    return {k.replace("unet.", "").replace("base_model.model.", "").replace(".default", ""): v
            for k, v in load_file(str(path)).items() if "gralora" in k}


@pytest.mark.slow
def test_best_step_is_the_highest_logged_score_and_its_adapter(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scorers = save_tiny_scorers(tmp_path / "scorers")
    result = train(_config(tmp_path, scorers, select_best="fidelity"), pipeline=gd.tiny_sdxl_pipeline(seed=0))
    out = tmp_path / "run"
    logged = EventAccumulator(str(out / "logs" / "gralora-dreambooth")).Reload().Scalars("validation/dino")
    assert [e.step for e in logged] == [1, 2, 3, 4, 5]
    best = max(logged, key=lambda e: (e.value, -e.step))  # the first of equal scores
    scores = json.loads((out / "best" / "scores.json").read_text())
    assert scores["best_step"] == best.step == result.best["best_step"]
    assert scores["best_score"] == pytest.approx(best.value, abs=1e-6)
    assert [v["step"] for v in scores["validations"]] == [1, 2, 3, 4, 5]
    kept = _unet_tensors(out / "best" / "pytorch_gralora_weights.safetensors")
    at_step = _unet_tensors(out / f"checkpoint-{best.step}" / "adapter_unet.safetensors")
    assert kept.keys() == at_step.keys() and kept
    assert all(torch.equal(kept[k], at_step[k]) for k in kept)


@pytest.mark.slow
def test_early_stop_ends_the_run_when_the_score_stops_improving(tmp_path):
    scorers = save_tiny_scorers(tmp_path / "scorers")
    cfg = _config(tmp_path, scorers, select_best="fidelity", early_stop_patience=1, max_train_steps=8, report_to="none")
    result = train(cfg, pipeline=gd.tiny_sdxl_pipeline(seed=0))
    history = result.best["validations"]
    scores = [h["score"] for h in history]
    # the run went on exactly while each validation beat every one before it
    first_miss = next((i for i in range(1, len(scores)) if scores[i] <= max(scores[:i])), None)
    assert first_miss is not None  # with this seed the score does stop improving, so patience runs out
    assert result.global_step == history[first_miss]["step"] < 8 and history[-1]["step"] == result.global_step
