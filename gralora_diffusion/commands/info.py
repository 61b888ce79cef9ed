HELP = ("Show what an adapter file holds: for GraLoRA base model, r, k, hybrid_r, alpha, targets, sizes; for a plain LoRA "
        "(diffusers or kohya keys) its format, rank and alpha per component, modules, parameters, dtype.")


def add_arguments(parser):
    parser.add_argument("adapter", help="GraLoRA adapter file, its folder, a PEFT save_pretrained folder or a Hub repo id; or a plain LoRA file or its folder")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")


def run(args) -> int:
    import json

    from ..info import adapter_info, format_info

    info = adapter_info(args.adapter)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
