HELP = "Show what a GraLoRA adapter file holds: base model, components, r, k, hybrid_r, alpha, targets, sizes."


def add_arguments(parser):
    parser.add_argument("adapter", help="adapter file, its folder, a PEFT save_pretrained folder, or a Hub repo id")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")


def run(args) -> int:
    import json

    from ..info import adapter_info, format_info

    info = adapter_info(args.adapter)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
