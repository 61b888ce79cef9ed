"""train --init_adapter FILE: a run continues from an adapter's weights; other settings are refused
before any model loads."""

import pytest
import torch
from conftest import PROMPT, SAMPLES

from gralora_diffusion.adapter_file import read_adapter_file
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, **kw):
    return TrainConfig(pretrained_model_name_or_path="tiny", instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                       output_dir=str(out), resolution=64, train_batch_size=1, max_train_steps=kw.pop("steps", 2), rank=4,
                       gralora_k=2, seed=0, report_to="none", checkpointing_steps=100, learning_rate=kw.pop("learning_rate", 1e-2),
                       **kw)


@pytest.mark.slow
def test_a_run_starts_from_the_adapters_weights(tmp_path):
    first = train(_cfg(tmp_path / "a")).weights_path
    started = train(_cfg(tmp_path / "b", init_adapter=str(first), steps=1, learning_rate=1e-12)).weights_path
    fresh = train(_cfg(tmp_path / "c", steps=1, learning_rate=1e-12)).weights_path
    a, b, c = (read_adapter_file(p).state_dicts["unet"] for p in (first, started, fresh))
    key = next(k for k in a if k.endswith("gralora_B"))
    assert torch.allclose(a[key], b[key], atol=1e-6)  # started from it: a tiny learning rate keeps its B
    assert not torch.allclose(a[key], c[key], atol=1e-6)  # a fresh run's B is not it


def test_other_settings_are_refused_before_loading(tmp_path, capsys):
    import gralora_diffusion as gd

    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    gd.add_gralora(pipe, r=8, gralora_k=2)
    pipe.save_gralora_weights(tmp_path / "adapter")
    args = ["train", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(SAMPLES), "--instance_prompt", PROMPT,
            "--output_dir", str(tmp_path / "out"), "--init_adapter", str(tmp_path / "adapter"), "--rank", "4"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "r=8" in err[0] and "--rank 8" in err[0] and not (tmp_path / "out").exists()
    assert cli_main(args[:-2] + ["--rank", "8", "--adapter", "lora"]) == 2
    assert "GraLoRA" in capsys.readouterr().err
