import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

import gralora_diffusion as gd
from gralora_diffusion.bases.sdxl import PRESETS

COMPONENTS = tuple(PRESETS)  # the tiny SDXL's adapter-bearing components

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


def outputs(pipe) -> torch.Tensor:
    """Both text encoders' penultimate states and one UNet call on them: what a generation reads,
    for a fraction of a pipeline call's time."""
    ids = torch.arange(1, 12).unsqueeze(0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out2 = pipe.text_encoder_2(ids, output_hidden_states=True)
        t2 = out2.hidden_states[-2]
        context = torch.cat([t1, t2], dim=-1)
        latents = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        added = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
        noise = pipe.unet(latents, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample
    return torch.cat([t1.flatten(), t2.flatten(), noise.flatten()])


def capture(pipe) -> dict:
    """Everything loading may change: weights, module classes, active adapters, trainable flags, configs."""
    state = {}
    for c in COMPONENTS:
        model = getattr(pipe, c)
        state[c] = {
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "modules": [(n, type(m)) for n, m in model.named_modules()],
            "active": [(n, list(m.active_adapters)) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)],
            "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "configs": sorted(getattr(model, "peft_config", {}) or {}),
        }
    return state


def assert_unchanged(pipe, before: dict, before_outputs: torch.Tensor | None = None,
                     parts=("modules", "active", "grad", "configs")) -> None:
    after = capture(pipe)
    for c in COMPONENTS:
        for part in parts:
            assert after[c][part] == before[c][part], (c, part)
        assert after[c]["weights"].keys() == before[c]["weights"].keys(), c
        for k, v in before[c]["weights"].items():
            assert torch.equal(after[c]["weights"][k], v), (c, k)
    if before_outputs is not None:
        assert torch.equal(outputs(pipe), before_outputs)


def adapted_pipeline(r=8, gralora_k=2, hybrid_r=4, text_encoder_targets="attn", seed=1, adapter_name="default"):
    """A patched tiny pipeline carrying one GraLoRA adapter with random (non-zero) B."""
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    configs = gd.add_gralora(pipe, r=r, gralora_k=gralora_k, hybrid_r=hybrid_r,
                             text_encoder_targets=text_encoder_targets, adapter_name=adapter_name)
    for i, c in enumerate(configs):
        randomize_gralora_B(getattr(pipe, c), seed=seed + i)
    return pipe


def fresh():
    """A patched tiny pipeline without adapters."""
    return gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
