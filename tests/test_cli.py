import subprocess
import sys

import pytest

from gralora_diffusion.cli import main


def test_make_tiny_writes_a_loadable_pipeline(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert "--pretrained_model_name_or_path" in capsys.readouterr().out


def test_make_tiny_on_a_file_is_one_readable_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["make-tiny", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0] and "Traceback" not in err[0]


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_misspelled_flag_names_the_right_one(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--stepz", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert "did you mean --steps?" in err[0] and "gralora-diffusion generate --help" in err[0]


@pytest.mark.parametrize("env, flag, expected", [(None, None, None), ("3", None, 3), ("3", 2, 2)])
def test_thread_count_is_chosen_and_said(monkeypatch, env, flag, expected):
    import os

    import torch

    from gralora_diffusion.threads import announce, choose_num_threads, set_num_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if env:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    before = torch.get_num_threads()
    try:
        note = set_num_threads(flag)
        default = max(1, min(4, (os.cpu_count() or 2) // 2))
        assert torch.get_num_threads() == (expected or default)
        assert note.startswith(f"CPU threads: {expected or default} (")
        assert ("--num_threads" if flag else "OMP_NUM_THREADS" if env else "default") in note
        said = []
        announce(said.append), announce(said.append)
        assert said == [note]  # once, when the work starts
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    with pytest.raises(gd_error()):
        choose_num_threads()


def gd_error():
    from gralora_diffusion.errors import GraloraConfigError

    return GraloraConfigError


def test_info_into_a_closed_pipe_ends_quietly(tmp_path):
    """`gralora-diffusion info ... | head`: no BrokenPipeError traceback."""
    import gralora_diffusion as gd
    from gralora_diffusion.adapter_file import collect_adapter, save_adapter_file

    pipe = gd.tiny_sdxl_pipeline(seed=0)
    gd.add_gralora(pipe, r=4, gralora_k=2)
    save_adapter_file(tmp_path / "a.safetensors", *collect_adapter({"unet": pipe.unet}))
    reader = subprocess.Popen(["true"], stdin=subprocess.PIPE)  # gone before info writes: a broken pipe
    writer = subprocess.run([sys.executable, "-m", "gralora_diffusion.cli", "info", str(tmp_path / "a.safetensors"), "--json"],
                            stdout=reader.stdin, stderr=subprocess.PIPE, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    reader.stdin.close()
    reader.wait()
    assert "Traceback" not in writer.stderr and "BrokenPipe" not in writer.stderr, writer.stderr
    assert writer.returncode == 0


def test_every_flag_of_every_command_has_help_text():
    import argparse

    from gralora_diffusion.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"generate", "info", "export-lora", "train", "quickstart"} <= set(commands)
    missing = [f"{name} {action.option_strings or action.dest}" for name, sub in commands.items() for action in sub._actions
               if action.help is None or not str(action.help).strip()]
    assert not missing, missing


# What the libraries print on their own and a user should never see (issue 13).
LIBRARY_NOISE = ("torch_dtype", "should be kept in float32", "torchvision", "Loading pipeline components", "Loading weights",
                 "Writing model shards", "upcast_vae", "peft_config", "Warning", "Traceback")


@pytest.mark.slow
def test_generate_and_info_show_no_library_noise(tmp_path, tiny_dir):
    """A real console run, base model from a folder in fp16 (the cast and deprecation paths), a GraLoRA
    adapter beside its LoRA export, then `info` on the LoRA: stderr holds our bar and nothing of the libraries'."""
    import os

    import gralora_diffusion as gd
    from conftest import SUBPROCESS_ENV

    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    gd.add_gralora(pipe, r=4, gralora_k=2, text_encoder_targets="attn")
    adapter = pipe.save_gralora_weights(tmp_path / "gralora")
    gd.export_lora(adapter, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "TRANSFORMERS_VERBOSITY"}  # as a user's shell has it
    runs = [["generate", "--base", str(tiny_dir), "--dtype", "fp16", "--adapter", str(tmp_path / "gralora"),
             "--adapter", f"{tmp_path / 'lora'}:0.5", "--prompt", "a teapot", "--steps", "1", "--output-dir", str(tmp_path / "out")],
            ["info", str(tmp_path / "lora")]]
    for argv in runs:
        result = subprocess.run([sys.executable, "-m", "gralora_diffusion.cli", *argv], capture_output=True, text=True,
                                timeout=300, env=env, cwd=os.fspath(tmp_path))
        assert result.returncode == 0, result.stderr
        noise = [word for word in LIBRARY_NOISE if word in result.stderr or word in result.stdout]
        assert not noise, (argv[0], noise, result.stderr)
    assert (tmp_path / "out" / "grid.png").is_file()
