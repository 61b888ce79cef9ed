"""A user who installs the wheel (no repository, no samples/) can run the quickstart."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SAMPLES, SUBPROCESS_ENV


def test_drawn_subject_is_samples_pixel_for_pixel(tmp_path):
    from gralora_diffusion.world.subject import draw_samples

    drawn = draw_samples(tmp_path)
    committed = sorted(SAMPLES.glob("*.png"))
    assert [p.name for p in drawn] == [p.name for p in committed]
    for a, b in zip(drawn, committed):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name


@pytest.mark.slow
def test_quickstart_runs_from_a_wheel_in_a_fresh_venv(tmp_path):
    # build from a copy of the tracked files, so the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                    str(src)], env=env, check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("gralora_diffusion-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], env=env, check=True,
                   capture_output=True, timeout=300)
    away = tmp_path / "elsewhere"  # not the checkout: nothing from it may be imported
    away.mkdir()
    where = subprocess.run([str(python), "-c", "import gralora_diffusion; print(gralora_diffusion.__file__)"], cwd=away,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where
    out = away / "quickstart_output"
    result = subprocess.run([str(venv / "bin" / "gralora-diffusion"), "quickstart", "--max_train_steps", "2"], cwd=away,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Drew the subject" in result.stdout
    assert len(list((out / "instance_images").glob("teapot_*.png"))) == 5
    assert (out / "pytorch_gralora_weights.safetensors").is_file() and (out / "before_after.png").is_file()
