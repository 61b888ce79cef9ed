import argparse
from pathlib import Path

HELP = "Export a GraLoRA adapter as a plain LoRA (exact, or SVD-truncated) for diffusers, ComfyUI and A1111."


def add_arguments(parser):
    parser.add_argument("src", help="adapter file, its folder, a PEFT save_pretrained folder, or a Hub repo id")
    parser.add_argument("dst", type=Path, help="output .safetensors file (or an existing folder)")
    parser.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers",
                        help="diffusers keys (diffusers' load_lora_weights) or kohya keys (diffusers, ComfyUI and A1111 "
                             "load every module); default diffusers")
    parser.add_argument("--svd_rank", type=int, default=None,
                        help="SVD-truncate every module to this rank; omit for the exact export (rank k*r + hybrid_r)")
    parser.add_argument("--rank", type=int, dest="svd_rank", default=None, help=argparse.SUPPRESS)  # the old name, still read
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="tensor dtype (default: the adapter's)")
    parser.add_argument("--max_size", type=float, default=None, metavar="MB", help="refuse if the file would be larger (MB = 10^6 bytes)")
    parser.add_argument("--layers_per_block", type=int, default=None,
                        help="the UNet's layers_per_block for kohya names (SDXL: 2); default: from the base model's config, "
                             "else from the adapter's names where unambiguous, else the export is refused")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    import json

    from ..errors import ExportError
    from ..export import export_lora
    from ..numbers import finite_number

    # checked here too so the error names the flag in MB; export_lora checks the bytes the same way
    max_size = None if args.max_size is None else finite_number(args.max_size, "--max_size", ExportError, low=0, low_open=True) * 1e6
    report = export_lora(args.src, args.dst, format=args.format, rank=args.svd_rank, dtype=args.dtype,
                         max_size=max_size, layers_per_block=args.layers_per_block)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0
