"""The pretraining stages by name, with the step counts the shipped weights were trained with."""

from __future__ import annotations

from pathlib import Path

# The shipped weights: the VAE ran 800 of a 1600-step schedule (the machine was busier than planned),
# then the decoder and the UNet ran side by side on that encoder.
DEFAULT_STEPS = {"vae": 1600, "decoder": 1800, "unet": 4000, "evaluator": 1200}
STOP_AT = {"vae": 800, "decoder": 1000}


def run(stage: str, run_dir: Path, steps: int | None = None, batch: int | None = None) -> None:
    steps = steps or DEFAULT_STEPS.get(stage)
    kw = {} if batch is None else {"batch": batch}
    if stage == "vae":
        from .pretrain import load_vae, train_vae, vae_psnr

        train_vae(run_dir, steps, stop_at=STOP_AT["vae"] if steps == DEFAULT_STEPS["vae"] else None, **kw)
        print(f"vae: {vae_psnr(load_vae(run_dir)):.2f} dB PSNR on held-out renders")
    elif stage == "decoder":
        from .pretrain import load_vae, train_decoder, vae_psnr

        train_decoder(run_dir, steps, stop_at=STOP_AT["decoder"] if steps == DEFAULT_STEPS["decoder"] else None, **kw)
        print(f"decoder: {vae_psnr(load_vae(run_dir, 'decoder')):.2f} dB PSNR on held-out renders")
    elif stage == "unet":
        from .pretrain_unet import train_unet

        train_unet(run_dir, steps, stop_at=STOP_AT.get("unet") if steps == DEFAULT_STEPS["unet"] else None, **kw)
    elif stage == "evaluator":
        from .evaluator import train_evaluator

        train_evaluator(run_dir, steps, **kw)
    elif stage == "export":
        from .weights import export_weights

        export_weights(run_dir)
