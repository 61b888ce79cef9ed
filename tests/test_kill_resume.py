"""Hardening: SIGKILL a training run at random moments after its first checkpoint, including in
the middle of writing a checkpoint; resuming from `latest` must end with the adapter of an
uninterrupted run, and no checkpoint folder is ever left half-written."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from conftest import SUBPROCESS_ENV as ENV

from gralora_diffusion.adapter_file import read_adapter_file
from gralora_diffusion.constants import STATE_NAME
from gralora_diffusion.train.save import complete_checkpoints

SCRIPT = str(ROOT / "scripts" / "train_dreambooth_gralora_sdxl.py")


def command(tiny_dir, out, *extra):
    return [sys.executable, SCRIPT, "--pretrained_model_name_or_path", str(tiny_dir), "--instance_data_dir",
            str(ROOT / "samples"), "--instance_prompt", "a photo of sks teapot", "--output_dir", str(out),
            "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "24", "--checkpointing_steps", "2",
            "--checkpoints_total_limit", "1", "--learning_rate", "1e-3", "--rank", "8", "--seed", "0",
            "--report_to", "none", *extra]


def run_until(cmd, cwd, condition, timeout=180):
    """Start cmd, SIGKILL it as soon as condition() holds; True if it was killed at that moment."""
    process = subprocess.Popen(cmd, env=ENV, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    held = False
    while process.poll() is None and not (held := condition()) and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    return process.wait() == -signal.SIGKILL and held


def assert_no_half_written_checkpoint(out: Path):
    for folder in out.glob("checkpoint-*"):
        assert (folder / STATE_NAME).is_file(), f"{folder} has no {STATE_NAME}: half-written"
        state = json.loads((folder / STATE_NAME).read_text())
        assert f"checkpoint-{state['global_step']}" == folder.name
    assert len(complete_checkpoints(out)) >= 1  # the limit never removed the only good one


def unet_weights(out: Path):
    return read_adapter_file(out / "pytorch_gralora_weights.safetensors").state_dicts["unet"]


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_and_at_a_random_moment_then_resume(tmp_path, tiny_dir):
    whole = subprocess.run(command(tiny_dir, tmp_path / "whole"), env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = unet_weights(tmp_path / "whole")

    # 1. killed while checkpoint-6 is being written (its temp folder exists)
    out = tmp_path / "during_write"
    assert run_until(command(tiny_dir, out), tmp_path, lambda: (out / ".tmp-checkpoint-6").exists())
    assert_no_half_written_checkpoint(out)
    assert not (out / "checkpoint-6").exists() or (out / "checkpoint-6" / STATE_NAME).is_file()

    # 2. then, resumed, killed again at a random moment after its next checkpoint
    delay = random.Random().uniform(0.0, 0.6)
    print(f"second kill {delay:.3f} s after the next checkpoint")
    seen = {}

    def after_next_checkpoint():
        done = [p for p in complete_checkpoints(out) if int(p.name.split("-")[1]) >= 8]
        if done and "t" not in seen:
            seen["t"] = time.monotonic()
        return "t" in seen and time.monotonic() - seen["t"] >= delay

    assert run_until(command(tiny_dir, out, "--resume_from_checkpoint", "latest"), tmp_path, after_next_checkpoint)
    assert_no_half_written_checkpoint(out)

    # 3. resumed to the end
    resumed = subprocess.run(command(tiny_dir, out, "--resume_from_checkpoint", "latest"), env=ENV, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = unet_weights(out)
    assert got.keys() == expected.keys()
    assert all((got[k] == expected[k]).all() for k in expected)
    assert not list(out.glob(".tmp-checkpoint-*")) and not list(out.glob(".old-checkpoint-*"))
