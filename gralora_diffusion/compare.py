"""`compare`: GraLoRA against LoRA (or any adapter settings against each other), side by side.

Every variant is trained with the same data, seeds and steps (`train`), then scored with
`evaluate_variant` on the same prompts and seeds against the instance images. Layout of `output_dir`:

    base/run.json, base/eval/*.png        the base model alone (evaluated once, the grid's first column)
    <variant>/seed<N>/                     one training run: the trainer's own outputs, plus
        train.log                          what the trainer printed (kept out of the comparison's one bar)
        run.json                           {"config", "train": {...}, "evaluation", "metrics"}: finished when it has metrics
        eval/*.png                         its evaluation images
    results.json, grid.png                 the summary (compare_report.py)

Run again with the same flags, a killed comparison skips finished runs, evaluates a trained one, and
resumes an unfinished one from its last checkpoint (the trainer's --resume_from_checkpoint latest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .constants import DEFAULT_VARIANTS  # noqa: F401  (re-exported: this module's public names)
from .compare_report import BASE_FOLDER, EVAL_FOLDER, load_images
from .errors import GraloraConfigError, TrainConfigError
from .recorded_base import record
from .train.config import TrainConfig

ALIASES = {"r": "rank", "k": "gralora_k", "lr": "learning_rate"}
VARIANT_KEYS = ("rank", "gralora_k", "hybrid_r", "alpha", "dropout", "learning_rate", "unet_targets", "quantize_base")
SHORT = {"rank": "r", "gralora_k": "k", "hybrid_r": "h", "learning_rate": "lr", "unet_targets": "t", "quantize_base": "q"}
RUN_FILE, LOG_FILE = "run.json", "train.log"
# Settings that change no trained weight: a finished run still counts when only these differ.
NOT_SHAPING = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "report_to", "logging_dir", "checkpointing_steps",
               "checkpoints_total_limit", "dataloader_num_workers", "push_to_hub", "hub_model_id", "validation_prompt",
               "validation_steps", "validation_epochs", "num_validation_images", "validation_metrics", "dino_model", "clip_model",
               "output_kohya_format")


@dataclass(frozen=True)
class Variant:
    spec: str  # as written: "gralora:r=32,k=2"
    settings: tuple  # ((TrainConfig field, value), ...), "adapter" first

    @property
    def name(self) -> str:
        """Folder and column name: 'gralora_r32_k2', 'gralora_r16_k2_h8', 'lora_r32', 'gralora_r8_k2_qint8'."""
        parts = [f"{SHORT.get(k, k)}{v}" for k, v in self.settings[1:] if k != "use_dora"]
        kind = "dora" if dict(self.settings).get("use_dora") else self.adapter
        return re.sub(r"[^\w.+-]", "-", "_".join([kind, *parts]))

    @property
    def adapter(self) -> str:
        return self.settings[0][1]


def parse_variant(text: str) -> Variant:
    """'gralora:r=32,k=2,hybrid_r=8', 'lora:r=32' or 'dora:r=8' (PEFT's DoRA, the LoRA baseline with
    --use_dora) -> Variant (keys: r, k, hybrid_r, alpha, dropout, lr, unet_targets, quantize_base)."""
    kind, _, rest = text.strip().partition(":")
    example = "e.g. gralora:r=32,k=2, lora:r=32 or dora:r=8"
    if kind not in ("gralora", "lora", "dora"):
        raise GraloraConfigError(f"--variants {text!r}: start with gralora:, lora: or dora: ({example}).")
    hints = typing.get_type_hints(TrainConfig)
    settings = {"adapter": "lora", "use_dora": True} if kind == "dora" else {"adapter": kind}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, sep, value = item.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not sep or key not in VARIANT_KEYS:
            raise GraloraConfigError(f"--variants {text!r}: {item!r} is not KEY=VALUE with KEY one of r, k, hybrid_r, "
                                     f"alpha, dropout, lr, unet_targets, quantize_base ({example}).")
        kind_of = next(t for t in (typing.get_args(hints[key]) or (hints[key],)) if t is not type(None))
        try:
            settings[key] = kind_of(value.strip())
        except ValueError:
            raise GraloraConfigError(f"--variants {text!r}: {key}={value!r} is not a {kind_of.__name__}.") from None
    if kind != "gralora" and ("gralora_k" in settings or settings.get("hybrid_r")):
        raise GraloraConfigError(f"--variants {text!r}: k and hybrid_r are GraLoRA settings; {kind} takes r, alpha, dropout, lr.")
    return Variant(text.strip(), tuple(settings.items()))


def parse_variants(texts: Sequence[str]) -> list[Variant]:
    variants = [v if isinstance(v, Variant) else parse_variant(v) for v in texts]
    if not variants:
        raise GraloraConfigError(f"--variants: give at least one, e.g. {' '.join(DEFAULT_VARIANTS)}.")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise GraloraConfigError(f"--variants: {sorted({n for n in names if names.count(n) > 1})} given twice.")
    return variants


def run_config(cfg: TrainConfig, variant: Variant, seed: int) -> TrainConfig:
    """The base config with the variant's settings, one seed, its own folder; LoRA gets hybrid_r 0."""
    settings = {"hybrid_r": 0, **dict(variant.settings)} if variant.adapter == "lora" else dict(variant.settings)
    folder = Path(cfg.output_dir) / variant.name / f"seed{seed}"
    return dataclasses.replace(cfg, **settings, seed=seed, output_dir=str(folder), resume_from_checkpoint=None,
                               overwrite_output_dir=True, push_to_hub=False)  # compare owns its run folders


def planned_runs(cfg: TrainConfig, variants, seeds, where: str = "") -> list[tuple[Variant, TrainConfig]]:
    """Every (variant, seed) run's config, each validated before any model loads; an error names the
    variant (and `where`, e.g. a benchmark's subject)."""
    runs = [(v, run_config(cfg, v, s)) for v in variants for s in seeds]
    for variant, rcfg in runs:
        try:
            rcfg.validate()
        except TrainConfigError as err:
            raise TrainConfigError(f"--variants {variant.spec}{where}: {err}") from None
    return runs


# Settings that may name a local file or folder: compared by where they point, so `study/r8/subjects/x`
# run from /tmp and `/tmp/study/r8/subjects/x` are the same run.
PATH_SETTINGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "instance_data_dir", "dataset_name",
                 "class_data_dir", "cache_dir", "init_adapter")


def comparable(cfg: TrainConfig) -> dict:
    """What must match for a finished run to count (JSON-normalised, local paths as adapters record them)."""
    return json.loads(json.dumps({k: where(k, v) for k, v in cfg.to_dict().items() if k not in NOT_SHAPING}))


def where(key: str, value):
    """A path setting's existing local path as its absolute real path (recorded_base.record, the rule an
    adapter's base follows); a Hub id, tiny/world, None or a missing path unchanged."""
    return record(value) if key in PATH_SETTINGS and value else value


def changed_settings(saved: dict | None, cfg: TrainConfig) -> list[str]:
    """The settings in which a run recorded as `saved` differs from `cfg`. A setting the record lacks
    (added by a later version) counts as its default, so an upgrade keeps finished runs."""
    now, defaults, saved = comparable(cfg), comparable(TrainConfig()), saved or {}
    saved = {k: where(k, v) for k, v in saved.items()}  # records of older versions kept the spelling
    return sorted(k for k, v in now.items() if saved.get(k, defaults.get(k)) != v)


@dataclass
class Evaluation:
    """What every column is scored with. `pipe` holds the base as --quantize_base loads it; a variant with
    its own quantize_base is scored on the base quantized that way (`pipe_for`), the one it trained over."""
    pipe: typing.Any
    scorers: list
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    resolution: int
    base: str = ""
    quantize_base: str = "none"
    family: str | None = None
    others: dict = dataclasses.field(default_factory=dict)

    def pipe_for(self, quantize_base: str):
        if quantize_base == self.quantize_base:
            return self.pipe
        if quantize_base not in self.others:
            from .bases import load_base

            self.others[quantize_base] = load_base(self.base, self.family, say=None, quantize_base=quantize_base)[0]
        return self.others[quantize_base]

    def settings(self) -> dict:
        return {"prompts": self.prompts, "seeds": self.seeds, "steps": self.steps, "guidance": self.guidance,
                "resolution": self.resolution}

    @property
    def images(self) -> int:
        return len(self.prompts) * len(self.seeds)


class PeakMemory:
    """Peak memory of what runs inside: torch.cuda's max allocated on a GPU, else the process's peak
    RSS (Linux: VmHWM, reset on entry through /proc/self/clear_refs; elsewhere the lifetime peak)."""

    def __enter__(self):
        self.kind, self.mb = "cpu peak RSS", None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda max allocated"
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "cpu peak RSS (process lifetime)"
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.mb = torch.cuda.max_memory_allocated() / 2**20
            return
        try:
            self.mb = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
        except (OSError, AttributeError):
            import resource

            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def read_record(folder: Path) -> dict:
    """run.json, checked by type (a record compare did not write, or an edited one, is redone, never
    trusted): {} when missing, unreadable or not of the shape compare writes."""
    path = folder / RUN_FILE
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError):  # written while killed: the run is redone from its checkpoint
        return {}
    return record if _record_shape_ok(record) else {}


def _record_shape_ok(record) -> bool:
    from .numbers import finite_number, whole_number

    if not isinstance(record, dict) or not isinstance(record.get("config", {}), dict):
        return False
    try:
        if "train" in record:
            train = record["train"]
            if not isinstance(train, dict) or not isinstance(train.get("weights"), str) or "/" in train["weights"]:
                return False
            whole_number(train.get("steps"), "steps", ValueError, low=0)
            whole_number(train.get("parameters"), "parameters", ValueError, low=0, high=2**63 - 1)
            for key in ("step_time_s", "peak_memory_mb"):
                if train.get(key) is not None:
                    finite_number(train[key], key, ValueError, low=0)
        metrics = record.get("metrics", {})
        if not isinstance(metrics, dict):
            return False
        for value in metrics.values():
            if value is not None:
                finite_number(value, "metric", ValueError)
    except ValueError:
        return False
    return True


def write_record(folder: Path, record: dict) -> None:
    from .atomic import atomic_write

    text = json.dumps(record, indent=2) + "\n"
    atomic_write(folder / RUN_FILE, lambda tmp: Path(tmp).write_text(text))  # whole or not at all


def save_images(folder: Path, images: list[list]) -> None:
    from .generate import save_image

    for p, row in enumerate(images):
        for s, image in enumerate(row):
            save_image(image, folder / f"p{p}-s{s}.png")


@contextlib.contextmanager
def set_aside(pipe):
    """On a GPU, the evaluation pipeline waits on the CPU while a variant trains."""
    device = pipe.device
    if device.type == "cuda":
        pipe.to("cpu")
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        if device.type == "cuda":
            pipe.to(device)


def train_run(rcfg: TrainConfig, base: str, bar) -> dict:
    """Train one run (resuming from its last checkpoint); its prints go to train.log. Returns its record."""
    from .train import train
    from .train.save import complete_checkpoints

    folder = Path(rcfg.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if complete_checkpoints(folder):
        rcfg = dataclasses.replace(rcfg, resume_from_checkpoint="latest")
    times, seen = [], [0]

    def on_step(step: int, loss: float) -> None:
        times.append(time.perf_counter())
        bar.update(step - seen[0])
        seen[0] = step

    start = time.perf_counter()
    with open(folder / LOG_FILE, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        with PeakMemory() as peak:
            result = train(rcfg, on_step=on_step)  # the trainer resolves tiny/world/folder/Hub id itself (bases.load_base)
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    record = {"weights": Path(result.weights_path).name, "steps": result.global_step, "resumed_at": result.global_step - len(times),
              "parameters": sum(p.numel() for m in result.components.values() for p in m.parameters() if p.requires_grad),
              "step_time_s": gaps[len(gaps) // 2] if gaps else None,  # median: checkpoints and samples fall outside it
              "peak_memory_mb": peak.mb, "memory": peak.kind, "wall_s": time.perf_counter() - start}
    bar.update(result.global_step - seen[0])
    del result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def run_one(variant: Variant, rcfg: TrainConfig, base: str, ev: Evaluation, bar) -> dict:
    """One run to the end: skipped when finished, evaluated when trained, else trained (resumed) first."""
    from .evaluate import evaluate_variant

    folder = Path(rcfg.output_dir)
    record = read_record(folder)
    changed = changed_settings(record.get("config"), rcfg) if record else []
    if changed:
        raise GraloraConfigError(f"{folder}: trained with other settings ({', '.join(changed)}); give another "
                                 f"--output_dir, or remove {folder} to train it again.")
    bar.set_postfix_str(f"{variant.name} seed {rcfg.seed}")
    if "train" not in record:
        with set_aside(ev.pipe):
            record = {"config": comparable(rcfg), "train": train_run(rcfg, base, bar)}
        write_record(folder, record)
    else:
        bar.update(record["train"]["steps"])
    if record.get("evaluation") != ev.settings() or "metrics" not in record:
        result = evaluate_variant(ev.pipe_for(rcfg.quantize_base), variant.name, folder / record["train"]["weights"], ev.scorers, ev.prompts, ev.seeds,
                                  ev.steps, ev.guidance, ev.resolution, adapter_name="compare", progress=bar)
        save_images(folder / EVAL_FOLDER, result.images)
        record |= {"evaluation": ev.settings(), "kind": result.kind, "metrics": result.metrics}
        write_record(folder, record)
    else:
        bar.update(ev.images)
    return record


def run_base(out: Path, base: str, ev: Evaluation, bar) -> dict:
    """The base model's column, evaluated once."""
    from .evaluate import BASE_LABEL, evaluate_variant

    folder = out / BASE_FOLDER
    record = read_record(folder)
    if (record.get("evaluation") != ev.settings() or record.get("base_model") != base
            or record.get("quantize_base", "none") != ev.quantize_base):
        bar.set_postfix_str(BASE_LABEL)
        result = evaluate_variant(ev.pipe, BASE_LABEL, None, ev.scorers, ev.prompts, ev.seeds, ev.steps, ev.guidance,
                                  ev.resolution, progress=bar)
        save_images(folder / EVAL_FOLDER, result.images)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"base_model": base, "quantize_base": ev.quantize_base, "evaluation": ev.settings(), "metrics": result.metrics}
        write_record(folder, record)
    else:
        bar.update(ev.images)
    return record


def estimated_steps(cfg: TrainConfig) -> int:
    """For the progress bar: --max_train_steps, else the epochs' updates (without buckets' rounding)."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    from .train.data import epoch_items
    from .train.hf_dataset import instance_records

    classes = cfg.num_class_images if cfg.with_prior_preservation else 0
    items = epoch_items(len(instance_records(cfg)), cfg.repeats, classes)
    batches = math.ceil(items / cfg.train_batch_size)
    return cfg.num_train_epochs * math.ceil(batches / cfg.gradient_accumulation_steps)


def compare(cfg: TrainConfig, variants: Sequence = DEFAULT_VARIANTS, seeds_per_variant: int = 1, prompts=None,
            eval_seeds: Sequence[int] = (0, 1), guidance: float = 5.0, progress: bool = True):
    """Train and score every variant x seed (seeds cfg.seed, cfg.seed + 1, ...); returns the `Comparison`
    (compare_report.py) and writes results.json and grid.png into cfg.output_dir.

    Evaluation: `prompts` (default DreamBooth's set for the instance prompt's subject) x `eval_seeds`, at
    cfg.num_inference_steps and cfg.resolution, scored with cfg.dino_model / cfg.clip_model and the base's
    own scorers (evaluate.BASE_SCORERS)."""
    from tqdm.auto import tqdm

    from .compare_report import summarize, write_report
    from .evaluate import default_prompts, instance_scorers, subject_of
    from .bases import default_device_dtype, load_base
    from .metrics import quiet_libraries
    from .threads import announce
    from .outputs import claim_folder
    from .train.hf_dataset import reference_images

    variants, base = parse_variants(variants), cfg.pretrained_model_name_or_path
    if not base:
        raise GraloraConfigError("--pretrained_model_name_or_path is required: tiny, world, a Hub id or a model folder.")
    from .numbers import limited

    limited("seeds_per_variant", seeds_per_variant)
    limited("eval_guidance", guidance)
    for seed in eval_seeds:
        limited("eval_seeds", seed)
    first = 0 if cfg.seed is None else cfg.seed
    seeds = list(range(first, first + seeds_per_variant))
    runs = planned_runs(cfg, variants, seeds)
    claim_folder(cfg.output_dir, "compare", protected=[(cfg.instance_data_dir, "instance images"),
                                                       (cfg.class_data_dir, "class images")], own=re.compile(r"grid\.png"))
    subject = subject_of(cfg.instance_prompt)
    prompts = list(prompts or []) or (default_prompts(subject) if subject else [])
    if not prompts:
        raise GraloraConfigError("compare: no evaluation prompts; give --instance_prompt (e.g. 'a photo of sks teapot') or --eval_prompt.")
    if not eval_seeds:
        raise GraloraConfigError("--eval_seeds: give at least one, e.g. 0,1.")
    dino, clip = cfg.metric_models
    announce()  # the CPU thread rule, for Python callers too
    scorers = instance_scorers(reference_images(cfg), cfg.instance_prompt, dino, clip, default_device_dtype(None)[0], base)
    with quiet_libraries():
        pipe, family = load_base(base, cfg.family, quantize_base=cfg.quantize_base)
    if cfg.resolution is None:  # the base's own size for every run and the evaluation, said once
        cfg.resolution = family.default_resolution(pipe)
        for _, rcfg in runs:
            rcfg.resolution = cfg.resolution
        print(f"Resolution: {cfg.resolution} px, the base's own (sample size x VAE factor); change with --resolution N")
    ev = Evaluation(pipe, scorers, prompts, [int(s) for s in eval_seeds], cfg.num_inference_steps, guidance, cfg.resolution,
                    base, cfg.quantize_base, cfg.family)
    bar = tqdm(total=len(runs) * estimated_steps(cfg) + (len(runs) + 1) * ev.images, desc="compare", unit="step",
               disable=not progress)
    records: dict[str, list[dict]] = {}
    try:
        base_record = run_base(Path(cfg.output_dir), base, ev, bar)
        for variant, rcfg in runs:
            records.setdefault(variant.name, []).append(run_one(variant, rcfg, base, ev, bar))
    finally:
        bar.close()
    entries = [summarize(v, run_config(cfg, v, seeds[0]), seeds, records[v.name]) for v in variants]
    return write_report(Path(cfg.output_dir), entries, base_record, ev)
