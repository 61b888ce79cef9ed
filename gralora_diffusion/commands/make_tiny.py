from pathlib import Path

HELP = "Write the embedded tiny SDXL (random weights) to a folder with save_pretrained."


def add_arguments(parser):
    parser.add_argument("directory", type=Path, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")


def run(args) -> int:
    from ..tiny import save_tiny_sdxl

    if args.directory.exists() and not args.directory.is_dir():
        raise NotADirectoryError(f"{args.directory} exists and is not a folder; give a folder path.")
    save_tiny_sdxl(args.directory, seed=args.seed)
    print(f"Wrote the tiny SDXL pipeline (seed {args.seed}) to {args.directory}/")
    print(f"Use it anywhere a model id goes, e.g. --pretrained_model_name_or_path {args.directory}")
    return 0
