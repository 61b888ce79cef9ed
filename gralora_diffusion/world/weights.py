"""Export a pretraining run's checkpoints as the shipped fp16 safetensors (EMA weights for the UNet
and text encoders; the fine-tuned decoder when that stage ran)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import COMPONENT_FILES, WEIGHTS_DIR, build_world_pipeline


def _fp16(module) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}


def export_weights(run_dir: Path, out_dir: Path = WEIGHTS_DIR) -> Path:
    from diffusers.training_utils import EMAModel

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    unet_state = torch.load(run_dir / "unet.pt", weights_only=True)
    vae_stage = "decoder" if (run_dir / "decoder.pt").is_file() else "vae"
    vae_state = torch.load(run_dir / f"{vae_stage}.pt", weights_only=True)
    scaling = torch.load(run_dir / "latents.pt", weights_only=True)["scaling_factor"]
    pipe = build_world_pipeline(scaling_factor=scaling)
    trained = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for name, module in trained.items():
        module.load_state_dict(unet_state["modules"][name])
    params = [p for m in trained.values() for p in m.parameters()]
    ema = EMAModel(params)
    ema.load_state_dict(unet_state["ema"])
    ema.copy_to(params)
    pipe.vae.load_state_dict(vae_state["modules"]["vae"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, file in COMPONENT_FILES.items():
        save_file(_fp16(getattr(pipe, name)), str(out_dir / file))
    meta = {"scaling_factor": scaling, "unet_steps": unet_state["step"], "vae_stage": vae_stage, "vae_steps": vae_state["step"]}
    ev = run_dir / "evaluator.pt"
    if ev.is_file():
        from .evaluator import WEIGHTS, WorldEvaluator

        model = WorldEvaluator()
        model.load_state_dict(torch.load(ev, weights_only=True)["modules"]["model"])
        save_file(_fp16(model), str(WEIGHTS))
    (out_dir / "world.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out_dir}: {meta}")
    return out_dir
