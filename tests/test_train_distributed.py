"""The trainer under real launchers: 2 processes on CPU (torchrun, gloo) end with identical adapter
weights on both ranks; the thin script, killed with SIGKILL and resumed, ends with the adapter that
an uninterrupted `accelerate launch` of it writes.

Run as a script (by the 2-process test), this file trains and writes each rank's adapter weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROMPT, ROOT, SUBPROCESS_ENV


def _env():
    return dict(SUBPROCESS_ENV)


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
    assert {p.name for p in (tmp_path / "out" / "checkpoint-4").glob("rng_*")} == {f"rng_{r}.{s}" for r in (0, 1) for s in ("json", "safetensors")}
    assert not [p for p in (tmp_path / "out" / "checkpoint-4").iterdir() if p.suffix not in (".json", ".safetensors")]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_adapter_of_an_uninterrupted_one(tmp_path, tiny_dir):
    """The thin script: once under `accelerate launch` uninterrupted, once SIGKILLed at whatever moment
    follows checkpoint-8 and resumed with `--resume_from_checkpoint latest`. Same adapter, bit for bit."""
    import signal
    import time

    from gralora_diffusion.adapter_file import read_adapter_file

    script = str(ROOT / "scripts" / "train_dreambooth_gralora_sdxl.py")

    def flags(name, *extra):
        return ["--pretrained_model_name_or_path", str(tiny_dir), "--instance_data_dir", str(ROOT / "samples"),
                "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / name), "--resolution", "64",
                "--train_batch_size", "1", "--max_train_steps", "20", "--checkpointing_steps", "4", "--learning_rate", "1e-3",
                "--rank", "8", "--seed", "0", "--random_flip", "--report_to", "none", *extra]

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    whole = subprocess.Popen(launcher + [script] + flags("whole"), env=_env(), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = open(tmp_path / "killed.log", "w")
    killed = subprocess.Popen([sys.executable, script] + flags("killed"), env=_env(), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=log)
    marker = tmp_path / "killed" / "checkpoint-8" / "training_state.json"
    deadline = time.monotonic() + 180
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    code = killed.wait()
    log.close()
    assert code == -signal.SIGKILL, f"the run ended (code {code}) before it could be killed: {(tmp_path / 'killed.log').read_text()[-3000:]}"
    assert not (tmp_path / "killed" / "pytorch_gralora_weights.safetensors").exists()
    resumed = subprocess.run([sys.executable, script] + flags("killed", "--resume_from_checkpoint", "latest"),
                             env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert whole.wait(timeout=240) == 0, whole.stderr.read()[-3000:]
    a, b = (read_adapter_file(tmp_path / name / "pytorch_gralora_weights.safetensors") for name in ("whole", "killed"))
    assert a.metadata["base_model"] == str(tiny_dir) and a.metadata["instance_prompt"] == PROMPT
    sa, sb = a.state_dicts["unet"], b.state_dicts["unet"]
    assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)


if __name__ == "__main__":  # one rank of the 2-process test
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from gralora_diffusion.train import TrainConfig, train

    torch.set_num_threads(1)
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    result = train(cfg)
    weights = {k: v.contiguous() for k, v in get_peft_model_state_dict(result.components["unet"]).items()}
    save_file(weights, Path(cfg.output_dir) / f"rank{os.environ.get('RANK', '0')}.safetensors")
