HELP = ("Train GraLoRA and LoRA variants on the same data, seeds and steps, score each (DINO, CLIP-I, CLIP-T, "
        "the base's own scorers) and show them side by side: results.json, a table and a grid. Flags as train, plus --variants.")


def add_arguments(parser):
    from ..constants import DEFAULT_VARIANTS
    from ..train.config import add_arguments as add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="KIND:KEY=VALUE,...",
                        help="adapters to compare, e.g. gralora:r=32,k=2 gralora:r=16,k=2,hybrid_r=8 lora:r=32 dora:r=32 (PEFT's DoRA) "
                             f"(keys r, k, hybrid_r, alpha, dropout, lr, unet_targets; default {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--seeds_per_variant", type=int, default=1,
                        help="training runs per variant, seeds --seed, --seed + 1, ... (default 1; 3 or more for a spread)")
    parser.add_argument("--eval_prompt", action="append", default=[],
                        help="evaluation prompt; repeat for several (default: DreamBooth's prompts for the instance prompt's subject)")
    parser.add_argument("--eval_seeds", default=None, help="comma-separated seeds, one evaluation image each per prompt "
                                                         "(default 0,1; with --benchmark world-bench 0)")
    parser.add_argument("--eval_guidance", type=float, default=5.0, help="guidance scale of the evaluation images (default 5)")
    parser.add_argument("--benchmark", choices=("world-bench", "dreambench"), default=None,
                        help="train every variant on every subject of a benchmark and report means with 95%% bootstrap "
                             "intervals and paired differences against the first variant: world-bench (the world's "
                             "drawn subjects; no --instance_data_dir) or dreambench (DreamBooth's dataset in --benchmark_dir)")
    parser.add_argument("--subjects", type=int, default=None, help="with --benchmark: the first N subjects only (default all)")
    parser.add_argument("--benchmark_dir", default=None,
                        help="with --benchmark dreambench: DreamBooth's dataset folder (a folder per subject, prompts_and_classes.txt)")


def run_benchmark(args) -> int:
    from ..benchmark import check_benchmark_args, make_benchmark, run_benchmark
    from ..evaluate import parse_seeds
    from ..train import TrainConfig

    defaults = check_benchmark_args(args)
    cfg = TrainConfig.from_args(args, defaults=defaults)
    benchmark = make_benchmark(args.benchmark, cfg, args.subjects, args.benchmark_dir)
    eval_seeds = parse_seeds(args.eval_seeds) if args.eval_seeds is not None else None
    report = run_benchmark(cfg, benchmark, args.variants, args.seeds_per_variant, eval_seeds, args.eval_guidance)
    print(report.table())
    print(f"Results (every run, and the summary): {report.json_path}")
    return 0


def run(args) -> int:
    if args.benchmark or args.subjects is not None or args.benchmark_dir:
        return run_benchmark(args)
    from ..compare import compare
    from ..evaluate import parse_seeds
    from ..train import TrainConfig

    result = compare(TrainConfig.from_args(args), args.variants, args.seeds_per_variant, args.eval_prompt or None,
                     parse_seeds(args.eval_seeds or "0,1"), args.eval_guidance)
    print(result.table())
    print(f"Grid (rows: prompts, columns: base, {', '.join(e['name'] for e in result.entries)}): {result.grid_path}")
    print(f"Results: {result.json_path}")
    return 0
