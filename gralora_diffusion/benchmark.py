"""`compare --benchmark NAME`: every variant trained on every subject of a benchmark with the same
seeds, each run scored on the subject's prompts; results.json keeps every run, the table gives means
with 95 % bootstrap intervals over subjects x seeds and paired differences against the first variant
(benchmark_report.py). The subjects come from benchmark_world.py (`world-bench`, drawn by code) or
benchmark_dreambench.py (`dreambench`, DreamBooth's dataset folder).

Each run is one `compare` run (compare.run_one: trained, resumed from its last checkpoint when killed,
skipped when finished). Layout of `output_dir`:

    <subject>/base/            the base model on the subject's prompts (its images are the drift reference)
    <subject>/<variant>/seed<N>/   one training run, as in `compare`
    results.json               every run and the summary
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import GraloraConfigError

BENCHMARKS = ("world-bench", "dreambench")
UNRELATED = "unrelated"  # the prompt role whose base and adapted images give the drift


@dataclass
class Task:
    """One subject of a benchmark: where its images are, how it is prompted and scored."""
    name: str
    instance_data_dir: Path
    instance_prompt: str
    prompts: dict[str, list[str]]  # role -> prompts; UNRELATED ones measure drift
    # scorer(base_images) -> callable (images, prompts) -> {metric: value}; base_images is
    # {prompt: [image per evaluation seed]} of the UNRELATED prompts, or None for the base model itself
    make_scorer: Callable

    @property
    def all_prompts(self) -> list[str]:
        return [p for ps in self.prompts.values() for p in ps]


@dataclass
class Benchmark:
    name: str
    tasks: list[Task]
    metrics: tuple[str, ...]  # the table's columns, in order
    lower_is_better: tuple[str, ...] = ("drift",)
    eval_seeds: tuple[int, ...] = (0, 1)  # one evaluation image per prompt and seed, unless --eval_seeds says otherwise


def unrelated_pairs(base_images: dict, images, prompts) -> tuple[list, list]:
    """(base images, adapted images) of the UNRELATED prompts, paired: the k-th image of a prompt (its
    k-th evaluation seed, as evaluate.score_images flattens them) with the base model's k-th."""
    base, adapted, seen = [], [], {}
    for image, prompt in zip(images, prompts):
        if prompt in base_images:
            base.append(base_images[prompt][seen.get(prompt, 0)])
            adapted.append(image)
            seen[prompt] = seen.get(prompt, 0) + 1
    return base, adapted


def base_images(task: Task, base_folder: Path, seeds: int) -> dict[str, list]:
    """The base model's images of the task's UNRELATED prompts, read back from its run (PNG: lossless)."""
    from .compare import EVAL_FOLDER, load_images

    prompts = task.all_prompts
    images = load_images(base_folder / EVAL_FOLDER, len(prompts), seeds)
    return {p: images[prompts.index(p)] for p in task.prompts.get(UNRELATED, [])}


def run_benchmark(cfg, benchmark: Benchmark, variants: Sequence, seeds_per_variant: int = 1, eval_seeds: Sequence[int] | None = None,
                  guidance: float = 5.0, progress: bool = True):
    """Train and score every variant x subject x seed (seeds cfg.seed, cfg.seed + 1, ...); writes
    results.json into cfg.output_dir and returns the report (benchmark_report.BenchmarkReport)."""
    from tqdm.auto import tqdm

    from .benchmark_report import BenchmarkReport, run_entry
    from .bases import load_base
    from .compare import Evaluation, estimated_steps, parse_variants, planned_runs, run_base, run_one
    from .metrics import quiet_libraries

    variants, base = parse_variants(variants), cfg.pretrained_model_name_or_path
    if not base:
        raise GraloraConfigError("--pretrained_model_name_or_path is required: world, a Hub id or a model folder.")
    if seeds_per_variant < 1:
        raise GraloraConfigError(f"--seeds_per_variant {seeds_per_variant}: at least 1.")
    eval_seeds = benchmark.eval_seeds if eval_seeds is None else eval_seeds
    if not eval_seeds:
        raise GraloraConfigError("--eval_seeds: give at least one, e.g. 0,1.")
    first = 0 if cfg.seed is None else cfg.seed
    seeds, out = list(range(first, first + seeds_per_variant)), Path(cfg.output_dir)
    plan = []  # (task, task config, [(variant, run config)])
    for task in benchmark.tasks:
        tcfg = dataclasses.replace(cfg, instance_data_dir=str(task.instance_data_dir), instance_prompt=task.instance_prompt,
                                   output_dir=str(out / task.name))
        plan.append((task, tcfg, planned_runs(tcfg, variants, seeds, f" on {task.name}")))
    with quiet_libraries():
        pipe, _ = load_base(base, cfg.family, quantize_base=cfg.quantize_base)
    evals = [int(s) for s in eval_seeds]
    # one Evaluation for every subject (its `others` holds each other quantization's base, loaded once)
    shared = Evaluation(pipe, [], [], evals, cfg.num_inference_steps, guidance, cfg.resolution, base, cfg.quantize_base, cfg.family)
    images = sum(len(t.all_prompts) * len(evals) * (len(runs) + 1) for t, _, runs in plan)
    bar = tqdm(total=sum(len(runs) * estimated_steps(tcfg) for _, tcfg, runs in plan) + images, desc=benchmark.name,
               unit="step", disable=not progress)
    entries, base_entries = [], []
    settings = {"seeds": evals, "steps": cfg.num_inference_steps, "guidance": guidance, "resolution": cfg.resolution}

    def report() -> BenchmarkReport:  # written after every run: a killed benchmark leaves the runs so far
        done = BenchmarkReport.build(benchmark, base, variants, seeds, settings, entries, base_entries)
        done.write(out)
        return done

    try:
        for task, tcfg, runs in plan:
            ev = dataclasses.replace(shared, scorers=[task.make_scorer(None)], prompts=task.all_prompts)
            base_record = run_base(out / task.name, base, ev, bar)
            base_entries.append({"subject": task.name, "metrics": base_record["metrics"]})
            reference = base_images(task, out / task.name / "base", len(evals))
            ev = dataclasses.replace(ev, scorers=[task.make_scorer(reference)])
            for variant, rcfg in runs:
                record = run_one(variant, rcfg, base, ev, bar)
                entries.append(run_entry(variant, task.name, rcfg, record, out))
                report()
    finally:
        bar.close()
    return report()


def check_benchmark_args(args) -> dict:
    """The command line's benchmark flags checked before anything loads; returns the benchmark's
    default settings (flags and --config override them)."""
    name = args.benchmark
    if not name:
        raise GraloraConfigError("--subjects and --benchmark_dir go with --benchmark world-bench or --benchmark dreambench.")
    own = [f"--{k}" for k in ("instance_data_dir", "instance_prompt", "eval_prompt") if getattr(args, k, None)]
    if own:
        raise GraloraConfigError(f"--benchmark {name} brings its own subjects and prompts: leave out {', '.join(own)}.")
    if args.subjects is not None and args.subjects < 1:
        raise GraloraConfigError(f"--subjects {args.subjects}: at least 1.")
    if name == "world-bench":
        from .benchmark_world import DEFAULTS

        if args.benchmark_dir:
            raise GraloraConfigError("--benchmark_dir is for --benchmark dreambench; world-bench draws its subjects.")
        base = getattr(args, "pretrained_model_name_or_path", "world")
        if base != "world":
            raise GraloraConfigError(f"--benchmark world-bench runs on the world base (its subjects and evaluator are the "
                                     f"world's), not {base!r}: leave out --pretrained_model_name_or_path.")
        return dict(DEFAULTS)
    if not args.benchmark_dir:
        raise GraloraConfigError("--benchmark dreambench needs --benchmark_dir DIR: DreamBooth's dataset folder "
                                 "(git clone https://github.com/google/dreambooth; DIR = dreambooth/dataset).")
    return {}


def make_benchmark(name: str, cfg, subjects: int | None = None, benchmark_dir=None) -> Benchmark:
    if name == "world-bench":
        from .benchmark_world import world_benchmark

        return world_benchmark(cfg.output_dir, subjects)
    from .benchmark_dreambench import dreambench

    return dreambench(benchmark_dir, cfg, subjects)
