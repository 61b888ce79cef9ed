"""The pretraining stages by name, with the step counts the shipped weights were trained with."""

from __future__ import annotations

from pathlib import Path

# How the shipped weights were trained: per stage, (schedule length, stop at) segments run in order,
# each resuming the last checkpoint. The machine was busier than planned, so the VAE ran 800 steps of
# a 1600-step schedule; then the UNet and the decoder ran side by side on that encoder, and the UNet's
# schedule was lengthened to 6000 steps at step 2750 when the machine got quieter.
SCHEDULES = {"vae": [(1600, 800)], "evaluator": [(1200, None)], "decoder": [(1800, None)], "unet": [(4000, 2750), (6000, None)]}


def run(stage: str, run_dir: Path, steps: int | None = None, batch: int | None = None) -> None:
    """Run one stage: the shipped schedule, or one `steps`-long schedule."""
    kw = {} if batch is None else {"batch": batch}
    if stage == "export":
        from .weights import export_weights

        export_weights(run_dir)
        return
    if stage == "measure":
        measure()
        return
    for total, stop_at in [(steps, None)] if steps else SCHEDULES[stage]:
        _train(stage, run_dir, total, stop_at, kw)


def _train(stage, run_dir, steps, stop_at, kw):
    if stage == "vae":
        from .pretrain import load_vae, train_vae, vae_psnr

        train_vae(run_dir, steps, stop_at=stop_at, **kw)
        print(f"vae: {vae_psnr(load_vae(run_dir)):.2f} dB PSNR on held-out renders")
    elif stage == "decoder":
        from .pretrain import load_vae, train_decoder, vae_psnr

        train_decoder(run_dir, steps, stop_at=stop_at, **kw)
        print(f"decoder: {vae_psnr(load_vae(run_dir, 'decoder')):.2f} dB PSNR on held-out renders")
    elif stage == "unet":
        from .pretrain_unet import train_unet

        train_unet(run_dir, steps, stop_at=stop_at, **kw)
    elif stage == "evaluator":
        from .evaluator import train_evaluator

        train_evaluator(run_dir, steps, stop_at=stop_at, **kw)


def measure() -> None:
    """The README's numbers for the shipped weights: evaluator accuracy, VAE PSNR, prompt following."""
    import time

    from .evaluator import WorldEvaluator, held_out_accuracy
    from .measure import prompt_following
    from .model import tiny_world_pipeline
    from .pretrain import vae_psnr

    evaluator, pipe = WorldEvaluator.load(), tiny_world_pipeline()
    print("evaluator, 2,000 held-out renders:", held_out_accuracy(evaluator))
    print(f"VAE PSNR, 256 held-out renders: {vae_psnr(pipe.vae):.2f} dB")
    for guidance in (5.0, 7.5):
        start = time.perf_counter()
        scores = prompt_following(pipe, evaluator, guidance=guidance)
        print(f"prompt following, guidance {guidance}, {scores.pop('pairs')} held-out scene x seed pairs:",
              {k: round(v, 3) for k, v in scores.items()}, f"({time.perf_counter() - start:.0f} s)")
