"""A single-file checkpoint as the base: `.safetensors` goes to diffusers' from_single_file; a pickled
`.ckpt` is refused in one line and never unpickled."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from gralora_diffusion.cli import main as cli_main


class _Trap:
    """Unpickling this writes a file: the proof that something unpickled the checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["merge", "adapter.safetensors"]])
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_checkpoint_is_refused_unopened(tmp_path, capsys, command, suffix):
    marker = tmp_path / "unpickled"
    checkpoint = tmp_path / f"sd_xl_base_1.0{suffix}"
    checkpoint.write_bytes(pickle.dumps(_Trap(str(marker))))
    out = tmp_path / "out"
    if command[0] == "merge":
        command = ["merge", str(tmp_path / "adapter.safetensors")]
        save_file({"unet.x.lora_A.weight": torch.zeros(1, 2), "unet.x.lora_B.weight": torch.zeros(2, 1)}, command[1])
    assert cli_main([*command, "--base", str(checkpoint), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never unpickles" in err[0] and str(checkpoint) in err[0]
    assert not marker.exists() and not out.exists()


def test_safetensors_file_goes_to_from_single_file(tmp_path, capsys):
    checkpoint = tmp_path / "not_a_whole_model.safetensors"
    save_file({"x": torch.zeros(2)}, str(checkpoint))
    out = tmp_path / "out"
    assert cli_main(["generate", "--base", str(checkpoint), "--prompt", "x", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "from_single_file" in err[0] and str(checkpoint) in err[0]
    assert not list(out.glob("*.png")) if out.exists() else True
