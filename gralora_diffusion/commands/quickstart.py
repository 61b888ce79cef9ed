import time
from pathlib import Path

HELP = "Offline demo of the main job: build the tiny SDXL, train a GraLoRA adapter on samples/ for a few dozen CPU steps, write the adapter and a sample grid."
PROMPT = "a photo of sks teapot"
SAMPLES = Path(__file__).resolve().parents[2] / "samples"  # the repository's samples/ (editable install)


def add_arguments(parser):
    parser.add_argument("--output_dir", type=Path, default=Path("quickstart_output"), help="where everything goes (default quickstart_output)")
    parser.add_argument("--instance_data_dir", type=Path, default=SAMPLES, help="images to train on (default: the repository's samples/)")
    parser.add_argument("--max_train_steps", type=int, default=40, help="updates (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the tiny model, the training and the samples (default 0)")


def run(args) -> int:
    import torch

    from ..tiny import save_tiny_sdxl
    from ..train import TrainConfig, train
    from ..train.data import scan_images

    # The tiny model's ops are so small that extra threads cost more than they give on a busy CPU.
    torch.set_num_threads(1)
    _quiet_loading_bars()
    start = time.perf_counter()
    out = args.output_dir
    base = out / "tiny-sdxl"
    cfg = TrainConfig(
        pretrained_model_name_or_path=str(base), instance_data_dir=str(args.instance_data_dir), instance_prompt=PROMPT,
        output_dir=str(out), resolution=64, random_flip=True, train_batch_size=2, max_train_steps=args.max_train_steps,
        learning_rate=3e-3, rank=8, gralora_k=2, seed=args.seed, checkpointing_steps=max(1, args.max_train_steps),
        validation_prompt=PROMPT, num_validation_images=4, num_inference_steps=8,
        report_to="tensorboard" if _has("tensorboard") else "none",
    )
    cfg.validate(need_model=False)  # bad flags fail before anything is written
    scan_images(cfg.instance_data_dir, cfg.instance_prompt)
    print(f"1/3 Writing the tiny SDXL (random weights, built offline) to {base} ...")
    save_tiny_sdxl(base, seed=args.seed)
    print(f"2/3 Training a GraLoRA adapter (r=8, k=2) on {args.instance_data_dir} for {args.max_train_steps} steps at 64 px, batch 2 ...")
    result = train(cfg)
    n = max(1, min(10, len(result.losses) // 2))
    first, last = sum(result.losses[:n]) / n, sum(result.losses[-n:]) / n
    print(f"3/3 Done in {time.perf_counter() - start:.0f} s. Loss (mean of {n} steps): {first:.3f} at the start, {last:.3f} at the end.")
    print(f"  adapter:  {result.weights_path}")
    print(f"  samples:  {result.grid_path}  (4 seeds of {PROMPT!r})")
    print(f"  card:     {out / 'README.md'}")
    print(f"  settings: {out / 'training_config.yaml'}  (reusable with --config)")
    print(f"  logs:     tensorboard --logdir {out / 'logs'}")
    print("Next: train on your own photos of a subject (GPU recommended):")
    print("  gralora-diffusion train --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\")
    print('      --instance_data_dir my_photos --instance_prompt "a photo of sks dog" --resolution 1024 \\')
    print("      --max_train_steps 500 --validation_prompt \"a photo of sks dog in a bucket\" --output_dir my_adapter")
    print("  (or `accelerate launch scripts/train_dreambooth_gralora_sdxl.py` with the same flags; README.md, section Training)")
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _quiet_loading_bars() -> None:
    """Only our own progress bar: no shard-writing / component-loading bars from the libraries."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
