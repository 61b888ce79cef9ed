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


@pytest.mark.slow
def test_console_script_runs(tmp_path):
    """The README's main command: tiny SDXL built offline, a short training run on samples/."""
    result = subprocess.run(
        [sys.executable, "-m", "gralora_diffusion.cli", "quickstart", "--output_dir", str(tmp_path), "--max_train_steps", "12"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pytorch_gralora_weights.safetensors").is_file()
    assert (tmp_path / "samples" / "final-grid.png").is_file()
    assert (tmp_path / "tiny-sdxl" / "model_index.json").is_file()
    assert "Next:" in result.stdout and "pytorch_gralora_weights.safetensors" in result.stdout
