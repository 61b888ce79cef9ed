"""One denoising step on a schedule stretched to a terminal sigma (`shift_terminal`, Qwen-Image's) gives
NaN images in diffusers; every path that generates refuses it in one line before anything is made, and
schedules without it (and two steps) still run."""

import math

import pytest
import torch
from conftest import PROMPT, SAMPLES
from diffusers import FlowMatchEulerDiscreteScheduler

import gralora_diffusion as gd
from gralora_diffusion.errors import GraloraConfigError
from gralora_diffusion.schedulers import check_steps

pytestmark = pytest.mark.usefixtures("one_thread")


class Holder:
    def __init__(self, scheduler):
        self.scheduler = scheduler


@pytest.mark.parametrize("shift_terminal", [0.02, 0.1, 0.5])
def test_diffusers_gives_nan_sigmas_at_one_step_and_the_rule_refuses_exactly_that(shift_terminal):
    scheduler = FlowMatchEulerDiscreteScheduler(shift_terminal=shift_terminal)
    scheduler.set_timesteps(1)
    assert math.isnan(float(scheduler.sigmas[0]))  # the library behaviour the rule stands on; fixed upstream -> revisit
    with pytest.raises(GraloraConfigError, match="--num_inference_steps 1: .*at least 2 steps") as err:
        check_steps(Holder(scheduler), 1)
    assert "\n" not in str(err.value)
    for steps in (2, 3):
        scheduler.set_timesteps(steps)
        assert torch.isfinite(scheduler.sigmas).all()
        check_steps(Holder(scheduler), steps)
    check_steps(Holder(FlowMatchEulerDiscreteScheduler()), 1)  # no terminal stretch: one step is fine
    check_steps(Holder(gd.tiny_sdxl_pipeline(seed=0).scheduler), 1)


def test_qwen_image_generate_and_train_refuse_one_step_and_run_two(tmp_path):
    from gralora_diffusion.generate import generate_samples
    from gralora_diffusion.train import TrainConfig, train

    kw = dict(prompts=[PROMPT], height=64, width=64, progress=False, family="qwen-image")
    with pytest.raises(GraloraConfigError, match="at least 2 steps"):
        generate_samples("tiny", output_dir=tmp_path / "one", steps=1, **kw)
    assert not list((tmp_path / "one").glob("*.png"))
    two = generate_samples("tiny", output_dir=tmp_path / "two", steps=2, **kw)
    assert all(p.is_file() for p in two.images)
    cfg = TrainConfig(pretrained_model_name_or_path="tiny", family="qwen-image", instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(tmp_path / "out"), resolution=64, train_batch_size=1, max_train_steps=2, rank=4, seed=0,
                      report_to="none", num_inference_steps=1, validation_prompt=PROMPT)
    with pytest.raises(GraloraConfigError, match="--num_inference_steps 1"):
        train(cfg)
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "pytorch_gralora_weights.safetensors").exists()
