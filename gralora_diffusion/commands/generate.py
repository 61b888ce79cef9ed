from pathlib import Path

from ..constants import GENERATE_OUTPUT_DIR as DEFAULT_OUTPUT_DIR
from ..quantize import add_argument as add_quantize_argument

HELP = "Generate images with GraLoRA (or plain LoRA) adapters: prompts x seeds x a scale sweep, each image plus one labelled grid."


def add_arguments(parser):
    from ..bases import add_family_argument

    parser.add_argument("--base", default=None, help="base model: Hub id, local folder, `tiny` (embedded, offline, random; "
                                                    "of --family's kind) or `world` (embedded SDXL, pretrained on the drawn world); "
                                                    "default: the base the first GraLoRA adapter records, else tiny")
    add_family_argument(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="GraLoRA adapter or plain LoRA file (diffusers or kohya keys), its folder or a Hub id, optional "
                             ":weight (default 1); repeat for several, e.g. a GraLoRA and its LoRA baseline side by side")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--prompts_file", type=Path, default=None, help="text file, one prompt per line (# comments)")
    parser.add_argument("--negative_prompt", default=None, help="what the images should not show, for every prompt (default: none)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per image (default 30)")
    parser.add_argument("--guidance", type=float, default=5.0,
                        help="classifier-free guidance scale: how closely images follow the prompt (default 5.0)")
    parser.add_argument("--height", type=int, default=None, help="default: the model's (64 for tiny and world)")
    parser.add_argument("--width", type=int, default=None, help="default: the model's (64 for tiny and world)")
    parser.add_argument("--scales", default="1.0", help="comma-separated adapter scales, one grid column each, e.g. 0,0.5,1.0")
    parser.add_argument("--side_by_side", action="store_true",
                        help="a grid column per adapter (each alone) and scale, e.g. a GraLoRA adapter beside its LoRA baseline; "
                             "default: all adapters together in every column")
    parser.add_argument("--per_image_adapters", action="store_true",
                        help="one batch per seed and scale, prompt i with adapter i alone (GraLoRA adapters); a prompts file "
                             "may instead name each line's adapter after a TAB: its --adapter number, its path, or none")
    parser.add_argument("--fuse", action="store_true", help="fuse the adapters into the weights per scale (faster on large runs)")
    parser.add_argument("--scheduler", default=None, metavar="NAME",
                        help="a diffusers scheduler class, e.g. EulerAncestralDiscreteScheduler or DPMSolverMultistepScheduler "
                             "(default: the base's own)")
    parser.add_argument("--init_image", type=Path, default=None,
                        help="image-to-image: start from this picture (resized to --width x --height, default the model's size)")
    parser.add_argument("--strength", type=float, default=0.8,
                        help="with --init_image: how much noise covers the picture, 0 < strength <= 1 (default 0.8)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp16 on cuda, fp32 on cpu")
    add_quantize_argument(parser)
    parser.add_argument("--output_dir", type=Path, default=Path(DEFAULT_OUTPUT_DIR),
                        help=f"folder for the images and grid.png (default {DEFAULT_OUTPUT_DIR}/); a folder holding "
                             "images generate did not write, such as a training set, is refused")


def run(args) -> int:
    from ..errors import GraloraConfigError
    from ..generate import generate_samples, parse_adapter, parse_scales, prompt_adapters, read_prompts

    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    prompts, per_image = prompt_adapters(prompts, args.adapter, args.per_image_adapters)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise GraloraConfigError(f"--seeds {args.seeds!r}: give integers separated by commas.") from None
    from ..recorded_base import default_base

    adapters = [parse_adapter(a) for a in args.adapter]
    result = generate_samples(
        base_model=args.base or default_base([path for path, _ in adapters]), adapters=adapters, prompts=prompts,
        output_dir=args.output_dir, negative_prompt=args.negative_prompt, seeds=seeds or [0], steps=args.steps,
        guidance=args.guidance, height=args.height, width=args.width, scales=parse_scales(args.scales),
        fuse=args.fuse, device=args.device, dtype=args.dtype, side_by_side=args.side_by_side, per_image_adapters=per_image,
        family=args.family, scheduler=args.scheduler, init_image=args.init_image, strength=args.strength,
        quantize_base=args.quantize_base,
    )
    print(f"Wrote {len(result.images)} images to {result.output_dir}/")
    print(f"Grid (rows: prompt x seed, columns: {', '.join(result.columns)}): {result.grid}")
    return 0
