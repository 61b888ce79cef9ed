HELP = "Train a GraLoRA (or LoRA) adapter on photos of a subject, DreamBooth-style (flags as diffusers' train_dreambooth_lora_sdxl.py)."


def add_arguments(parser):
    from ..train.config import add_arguments as add_config_arguments

    add_config_arguments(parser)


def run(args) -> int:
    from ..train import TrainConfig, train

    cfg = TrainConfig.from_args(args)
    result = train(cfg)
    if result.weights_path is not None:
        print(f"Done: {result.global_step} steps. Adapter: {result.weights_path}")
        if result.grid_path is not None:
            print(f"Samples: {result.grid_path}")
        logs = result.output_dir / cfg.logging_dir
        if cfg.report_to == "tensorboard" and logs.is_dir():  # only a folder that exists
            print(f"Logs: tensorboard --logdir {logs}")
    return 0
