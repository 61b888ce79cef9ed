"""The trainer under real launchers: 2 processes on CPU (torchrun, gloo) end with identical adapter
weights on both ranks; `accelerate launch` runs the thin script with 1 process.

Run as a script (by the 2-process test), this file trains and writes each rank's adapter weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks teapot"


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from gralora_diffusion.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


@pytest.mark.slow
def test_two_processes_end_with_identical_adapters(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    settings = dict(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(ROOT / "samples"), instance_prompt=PROMPT,
                    output_dir=str(tmp_path / "out"), resolution=64, train_batch_size=1, max_train_steps=4, checkpointing_steps=2,
                    learning_rate=1e-3, rank=8, seed=0, random_flip=True, report_to="none")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, json.dumps(settings)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / "out" / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    assert all((ranks[0][k] == ranks[1][k]).all() for k in ranks[0])
    assert any(ranks[0][k].abs().sum() > 0 for k in ranks[0] if "gralora_B" in k)  # it did train
    assert (tmp_path / "out" / "pytorch_gralora_weights.safetensors").is_file()
    assert {p.name for p in (tmp_path / "out" / "checkpoint-4").glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}


@pytest.mark.slow
def test_accelerate_launch_runs_the_script(tmp_path, tiny_dir):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "train_dreambooth_gralora_sdxl.py"),
               "--pretrained_model_name_or_path", str(tiny_dir), "--instance_data_dir", str(ROOT / "samples"),
               "--instance_prompt", PROMPT, "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "2",
               "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--seed", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    from gralora_diffusion.adapter_file import read_adapter_file

    adapter = read_adapter_file(tmp_path / "out" / "pytorch_gralora_weights.safetensors")
    assert adapter.metadata["base_model"] == str(tiny_dir) and adapter.metadata["instance_prompt"] == PROMPT


if __name__ == "__main__":  # one rank of the 2-process test
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from gralora_diffusion.train import TrainConfig, train

    torch.set_num_threads(1)
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    result = train(cfg)
    weights = {k: v.contiguous() for k, v in get_peft_model_state_dict(result.components["unet"]).items()}
    save_file(weights, Path(cfg.output_dir) / f"rank{os.environ['RANK']}.safetensors")
