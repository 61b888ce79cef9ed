from pathlib import Path

HELP = ("Score adapters with DreamBooth's metrics (DINO, CLIP-I, CLIP-T): the base alone and each adapter "
        "(GraLoRA or plain LoRA), a table, --json and a labelled grid.")


def add_arguments(parser):
    from ..constants import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, REFERENCE_IMAGES
    from ..quantize import add_argument as add_quantize_argument

    from ..bases import add_family_argument

    parser.add_argument("--base", default=None, help="base model: Hub id, local folder, `tiny` (embedded, offline, random; "
                                                    "of --family's kind) or `world` (embedded SDXL, pretrained on the drawn world); "
                                                    "default: the base the first GraLoRA adapter records, else tiny")
    add_family_argument(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="[LABEL=]PATH",
                        help="GraLoRA or plain LoRA file, folder or Hub id, each scored alone; repeat for several")
    parser.add_argument("--instance_data_dir", type=Path, default=None,
                        help="folder of the subject photos the generated images are compared with")
    parser.add_argument("--dataset_name", default=None,
                        help="or a 🤗 datasets set of them (Hub id, imagefolder, parquet or save_to_disk folder), as train takes it")
    parser.add_argument("--dataset_config_name", default=None, help="the dataset's configuration (subset) name")
    parser.add_argument("--dataset_split", default="train", help="the dataset's split (default train)")
    parser.add_argument("--image_column", default=None, help="the dataset's image column (default: its first Image feature)")
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help=f"compare with the dataset's first N images (default and at most {REFERENCE_IMAGES})")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it (reads only the rows used)")
    parser.add_argument("--subject", default="sks teapot",
                        help='identifier and class, e.g. "sks teapot": fills the default DreamBooth prompts')
    parser.add_argument("--identifier", default=None,
                        help="word removed from prompts for CLIP-T (default: the subject's first word; '' keeps prompts as written)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (instead of the default set); repeat for several")
    parser.add_argument("--prompts_file", type=Path, default=None, help="text file, one prompt per line (# comments)")
    parser.add_argument("--negative_prompt", default=None,
                        help="what the images should not show, for every prompt (default: none)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds, one image each per prompt (default 0,1)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per image (default 30)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    parser.add_argument("--resolution", type=int, default=None, help="square images of this size (default: the model's)")
    parser.add_argument("--dino_model", default=DEFAULT_DINO_MODEL, help=f"Hub id or folder (default {DEFAULT_DINO_MODEL}); 'none' skips DINO")
    parser.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help=f"Hub id or folder (default {DEFAULT_CLIP_MODEL}); 'none' skips CLIP-I/T")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp16 on cuda, fp32 on cpu")
    add_quantize_argument(parser)
    parser.add_argument("--output_dir", type=Path, default=Path("evaluation"), help="grid.png and results.json go here")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON here")


def _adapter(text: str):
    label, sep, path = text.partition("=")
    return (label, path) if sep and label and not Path(text).exists() else text


def run(args) -> int:
    from ..evaluate import evaluate_adapter, format_table, parse_seeds
    from ..errors import GraloraConfigError
    from ..generate import read_prompts
    from ..recorded_base import default_base
    from ..train.hf_dataset import reference_images

    if (args.instance_data_dir is None) == (args.dataset_name is None):
        raise GraloraConfigError("Give the instance images: --instance_data_dir FOLDER (the subject photos) or --dataset_name DATASET, one of them.")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise GraloraConfigError(f"--max_train_samples {args.max_train_samples}: at least 1.")
    instance_images = reference_images(args) if args.dataset_name else None
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    seeds = parse_seeds(args.seeds)
    adapters = [_adapter(a) for a in args.adapter]
    base = args.base or default_base([a[1] if isinstance(a, tuple) else a for a in adapters])
    result = evaluate_adapter(
        base_model=base, adapters=adapters, instance_data_dir=args.instance_data_dir,
        instance_images=instance_images,
        subject=args.subject, prompts=prompts or None, identifier=args.identifier, seeds=seeds, steps=args.steps,
        guidance=args.guidance, resolution=args.resolution, negative_prompt=args.negative_prompt,
        dino_model=None if args.dino_model.lower() == "none" else args.dino_model,
        clip_model=None if args.clip_model.lower() == "none" else args.clip_model,
        output_dir=args.output_dir, json_path=args.json, device=args.device, dtype=args.dtype, family=args.family,
        quantize_base=args.quantize_base,
    )
    print(format_table(result))
    print(f"Grid (rows: prompts, columns: {', '.join(v.name for v in result.variants)}; seeds side by side): {result.grid}")
    print(f"Results: {result.json_path}")
    return 0
