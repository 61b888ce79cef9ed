from pathlib import Path

HELP = "Write the embedded tiny SDXL (random weights; --world: the one pretrained on the drawn world) to a folder with save_pretrained."


def add_arguments(parser):
    parser.add_argument("directory", type=Path, help="output folder: new, empty, or one make-tiny wrote before (anything else is refused)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--world", action="store_true", help="write the world model (pretrained, shipped weights) instead")


def run(args) -> int:
    from ..tiny import save_tiny_sdxl

    # save_tiny_sdxl / save_world_sdxl apply the output rule (outputs.claim_folder) before building anything
    if args.world:
        from ..world.model import save_world_sdxl

        save_world_sdxl(args.directory)
        print(f"Wrote the tiny world SDXL pipeline to {args.directory}/")
    else:
        save_tiny_sdxl(args.directory, seed=args.seed)
        print(f"Wrote the tiny SDXL pipeline (seed {args.seed}) to {args.directory}/")
    print(f"Use it anywhere a model id goes, e.g. --pretrained_model_name_or_path {args.directory}")
    return 0
