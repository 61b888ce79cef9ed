from pathlib import Path

HELP = "Upload an adapter folder (adapter, model card, sample images, optionally the exact LoRA export) to the Hugging Face Hub."


def add_arguments(parser):
    parser.add_argument("folder", type=Path, help="a training output_dir: holding pytorch_gralora_weights.safetensors, or the --adapter lora baseline's pytorch_lora_weights.safetensors")
    parser.add_argument("repo_id", help="Hub repository, e.g. your-name/sks-teapot-gralora (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--commit-message", default="Upload GraLoRA adapter", help="the Hub commit's message")
    parser.add_argument("--dry-run", action="store_true", help="print the files a push would upload and stop (nothing is sent)")
    parser.add_argument("--include-lora-export", action="store_true",
                        help="also write and upload pytorch_lora_weights.safetensors, the exact plain-LoRA export")


def run(args) -> int:
    from ..hub import push_to_hub

    info = push_to_hub(args.folder, args.repo_id, private=args.private, token=args.token,
                       commit_message=args.commit_message, include_lora_export=args.include_lora_export,
                       dry_run=args.dry_run, say=print)
    if args.dry_run:
        return 0
    print(f"Pushed {args.folder} to {info.repo_url}  (commit {info.oid[:10]})")
    return 0
