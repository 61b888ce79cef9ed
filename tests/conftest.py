import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import gralora_diffusion as gd

PROMPT = "a photo of sks teapot"
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
# for subprocess runs: one thread, offline, quiet, and this checkout first on the path
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                  "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module's tests run (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    the tiny model's ops are too small for threads to pay off on a busy 2-core machine. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny SDXL written with save_pretrained, for runs that load a model folder."""
    from gralora_diffusion.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


@pytest.fixture
def tiny_pipe():
    return gd.tiny_sdxl_pipeline(seed=0)


def generate(pipe, prompt=PROMPT, seed=0, steps=2, **kwargs):
    """A 64x64 image as a float numpy array, deterministic for the seed."""
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images


def randomize_gralora_B(model, adapter_name=None, std=0.1, seed=1):
    """Adapters start as a no-op (B = 0); give B (and the hybrid B) random values so they act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("gralora_B" in name) and (adapter_name is None or f".{adapter_name}" in name):
                p.copy_(torch.randn(p.shape, generator=g) * std)
