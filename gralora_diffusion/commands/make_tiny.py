from pathlib import Path

HELP = ("Write an embedded tiny pipeline (random weights, of --family's kind, default sdxl; --world: the SDXL pretrained "
        "on the drawn world) to a folder with save_pretrained.")


def add_arguments(parser):
    from ..bases import add_family_argument

    parser.add_argument("directory", type=Path, help="output folder: new, empty, or one make-tiny wrote before (anything else is refused)")
    add_family_argument(parser, "which family's tiny pipeline (default sdxl)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--world", action="store_true", help="write the world model (pretrained, shipped weights) instead")


def run(args) -> int:
    from ..bases import DEFAULT_FAMILY, save_tiny
    from ..errors import GraloraConfigError

    # save_tiny / save_world_sdxl apply the output rule (outputs.claim_folder) before building anything
    if args.world:
        if args.family not in (None, DEFAULT_FAMILY):
            raise GraloraConfigError(f"--world is an {DEFAULT_FAMILY} model; leave out --family {args.family}.")
        from ..world.model import save_world_sdxl

        save_world_sdxl(args.directory)
        print(f"Wrote the tiny world SDXL pipeline to {args.directory}/")
    else:
        family = args.family or DEFAULT_FAMILY
        save_tiny(family, args.directory, seed=args.seed)
        print(f"Wrote the tiny {family} pipeline (seed {args.seed}) to {args.directory}/")
    print(f"Use it anywhere a model id goes, e.g. --pretrained_model_name_or_path {args.directory}")
    return 0
