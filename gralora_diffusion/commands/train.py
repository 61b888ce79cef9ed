HELP = "Train a GraLoRA (or LoRA) adapter on photos of a subject, DreamBooth-style (flags as diffusers' train_dreambooth_lora_sdxl.py)."


def add_arguments(parser):
    from ..train.config import add_arguments as add_config_arguments

    add_config_arguments(parser)


def run(args) -> int:
    from ..train import TrainConfig, train

    result = train(TrainConfig.from_args(args))
    if result.weights_path is not None:
        print(f"Done: {result.global_step} steps. Adapter: {result.weights_path}")
        if result.grid_path is not None:
            print(f"Samples: {result.grid_path}")
    return 0
