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
    result = subprocess.run(
        [sys.executable, "-m", "gralora_diffusion.cli", "quickstart", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "scale_grid.png").is_file()
    assert "Next:" in result.stdout
