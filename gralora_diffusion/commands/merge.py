from pathlib import Path

HELP = ("Fuse an adapter (GraLoRA or plain LoRA) into its base at a chosen scale and write the full pipeline folder "
        "(save_pretrained), which stock diffusers loads with from_pretrained.")


def add_arguments(parser):
    from ..bases import add_family_argument

    parser.add_argument("adapter", help="GraLoRA adapter or plain LoRA: file, folder or Hub id")
    parser.add_argument("--base", default="tiny", help="the base the adapter was made for: Hub id, local folder, `tiny` or `world` (default tiny)")
    add_family_argument(parser)
    parser.add_argument("--output_dir", type=Path, required=True, help="the merged pipeline's folder: new, empty, or one merge wrote before")
    parser.add_argument("--scale", type=float, default=1.0, help="the adapter's strength in the fused weights (default 1.0)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp16 on cuda, fp32 on cpu")


def run(args) -> int:
    from ..merge import merge_adapter

    folder = merge_adapter(args.adapter, base=args.base, output_dir=args.output_dir, scale=args.scale, family=args.family,
                           device=args.device, dtype=args.dtype)
    print(f"Wrote the base with {args.adapter} fused at scale {args.scale:g} to {folder}/")
    print(f"Load it with stock diffusers: DiffusionPipeline.from_pretrained({str(folder)!r})")
    return 0
