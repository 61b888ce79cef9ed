"""--fused_backward_pass: each adapter weight steps inside backward and drops its gradient. Without
clipping the result is the unfused run's bit for bit (training and a killed-and-resumed run); with
clipping each weight is clipped alone; what it cannot do is refused in one line."""

import types

import pytest
import torch
from conftest import PROMPT, SAMPLES
from peft.utils import get_peft_model_state_dict

import gralora_diffusion as gd
from gralora_diffusion.errors import TrainConfigError
from gralora_diffusion.tiny import TINY_MODEL_ID
from gralora_diffusion.train import TrainConfig, train
from gralora_diffusion.train.fused_backward import check_fusable_backward, fuse_optimizer_into_backward

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    pass


def run(tmp_path, name, on_step=None, **kw):
    settings = dict(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                    output_dir=str(tmp_path / name), resolution=64, train_batch_size=1, max_train_steps=6,
                    learning_rate=1e-3, rank=8, seed=0, report_to="none", checkpointing_steps=1000, max_grad_norm=0.0,
                    lr_scheduler="cosine", lr_warmup_steps=2)
    return train(TrainConfig(**{**settings, **kw}), pipeline=gd.tiny_sdxl_pipeline(seed=0), on_step=on_step)


def adapter(result):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(result.components["unet"]).items()}


def test_fused_training_equals_unfused_and_resumes_exactly(tmp_path):
    plain = run(tmp_path, "plain")
    fused = run(tmp_path, "fused", fused_backward_pass=True)
    a, b = adapter(plain), adapter(fused)
    assert fused.losses == plain.losses and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)  # it trained

    def kill_at_5(step, loss):
        if step == 5:  # after checkpoint-4
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path, "parts", on_step=kill_at_5, fused_backward_pass=True, checkpointing_steps=2)
    resumed = run(tmp_path, "parts", fused_backward_pass=True, checkpointing_steps=2, resume_from_checkpoint="latest")
    c = adapter(resumed)
    assert resumed.losses == plain.losses[4:] and all(torch.equal(a[k], c[k]) for k in a)


def two_layer_step(fused: bool, max_grad_norm: float):
    """Two AdamW steps on two Linears (a state dict round trip between them, as a resume does); the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    if fused:
        fuse_optimizer_into_backward(optimizer, max_grad_norm)
    x = torch.randn(3, 4)
    for lr in (0.1, 0.05):
        optimizer.load_state_dict(optimizer.state_dict())  # new state and group dicts: the hooks must follow them
        optimizer.param_groups[0]["lr"] = lr  # as the schedule does
        (model(x) * 50).pow(2).sum().backward()
        if not fused:
            if max_grad_norm:
                for p in model.parameters():  # the fused rule: each weight clipped on its own
                    torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
            optimizer.step()
        assert all(p.grad is None for p in model.parameters()) or not fused
        optimizer.zero_grad(set_to_none=True)
    assert all(optimizer.state[p]["step"].item() == 2 for p in model.parameters())
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_each_weight_steps_once_with_the_schedules_lr_and_its_own_clip(max_grad_norm):
    fused, plain = two_layer_step(True, max_grad_norm), two_layer_step(False, max_grad_norm)
    assert all(torch.equal(f, p) for f, p in zip(fused, plain))
    if max_grad_norm:  # and the per-weight clip is not the global one
        assert not all(torch.equal(f, p) for f, p in zip(fused, two_layer_step(False, 0.0)))


@pytest.mark.parametrize("change, processes, words", [
    ({"gradient_accumulation_steps": 2}, 1, "--gradient_accumulation_steps"),
    ({"optimizer": "prodigy"}, 1, "--optimizer"),
    ({"optimizer": "adamw8bit"}, 1, "--optimizer"),
    ({"mixed_precision": "fp16"}, 1, "--mixed_precision"),
    ({}, 2, "2 processes"),
])
def test_what_cannot_step_one_weight_is_refused_in_one_line(change, processes, words):
    cfg = types.SimpleNamespace(**{**dict(fused_backward_pass=True, gradient_accumulation_steps=1, optimizer="adamw",
                                          mixed_precision="bf16"), **change})
    with pytest.raises(TrainConfigError, match="--fused_backward_pass") as err:
        check_fusable_backward(cfg, processes, TrainConfigError)
    assert words in str(err.value) and "\n" not in str(err.value)
    check_fusable_backward(types.SimpleNamespace(**{**vars(cfg), "fused_backward_pass": False}), processes, TrainConfigError)


def test_the_cli_refuses_before_loading(tmp_path, capsys):
    from gralora_diffusion.cli import main

    code = main(["train", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(SAMPLES), "--instance_prompt", PROMPT,
                 "--output_dir", str(tmp_path / "o"), "--fused_backward_pass", "--gradient_accumulation_steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--fused_backward_pass" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
