"""`evaluate_adapter`: generate with the base model alone and with each adapter, and score every
variant with DreamBooth's DINO, CLIP-I and CLIP-T against the instance images (plus any extra
scorers, e.g. the tiny world's evaluator). Writes a table, JSON and one labelled grid (rows:
prompts, columns: base + adapters, the seeds side by side in each cell).

Built so `compare` can call it per variant: pass the loaded `pipe`, the `scorers` built once
(`build_scorers`), `include_base=False`, and one `progress` bar for the whole run.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from .constants import IMAGE_SUFFIXES
from .errors import GraloraConfigError
from .grids import save_grid
from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
from .grids import adapter_label, labelled_variant_grid
from .quiet import progress_bar, quiet_libraries

# DreamBooth's object prompts (google/dreambooth, prompts_and_classes.txt), a subset; {} = the subject
# with its identifier, e.g. "sks teapot". The first is the instance prompt's form.
DREAMBOOTH_PROMPTS = (
    "a photo of {}",
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a red {}",
    "a {} floating on top of water",
)
# base name -> "module:function" returning extra scorers for it: function(instance_images, device) -> list
BASE_SCORERS: dict[str, str] = {"world": "gralora_diffusion.world.scorers:world_scorers"}
BASE_LABEL = "base"


@dataclass
class VariantResult:
    name: str  # column label: "base" or the adapter's label
    source: str | None  # adapter path / repo id; None for the base
    kind: str | None  # "gralora", "lora" or None
    metrics: dict[str, float] = field(default_factory=dict)
    images: list[list[Image.Image]] = field(default_factory=list, repr=False)  # [prompt][seed]


@dataclass
class EvaluationResult:
    base_model: str
    prompts: list[str]
    seeds: list[int]
    steps: int
    variants: list[VariantResult]
    settings: dict = field(default_factory=dict)  # models, identifier, resolution, guidance, instance images
    grid: Path | None = None
    json_path: Path | None = None

    def to_dict(self) -> dict:
        variants = [{k: v for k, v in asdict(r).items() if k != "images"} for r in self.variants]
        return {"base_model": self.base_model, "prompts": self.prompts, "seeds": self.seeds, "steps": self.steps,
                **self.settings, "variants": variants}


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise GraloraConfigError(f"--seeds {text!r}: give integers separated by commas.") from None


def default_prompts(subject: str) -> list[str]:
    return [template.format(subject) for template in DREAMBOOTH_PROMPTS]


def default_identifier(subject: str) -> str | None:
    """'sks teapot' -> 'sks' (DreamBooth's '<identifier> <class>'); one word -> None."""
    words = subject.split()
    return words[0] if len(words) > 1 else None


def subject_of(instance_prompt: str | None) -> str | None:
    """'a photo of sks teapot' -> 'sks teapot': the prompt without a leading 'a photo of' (or 'an
    image of', 'a picture of', 'a', 'an')."""
    if not instance_prompt:
        return None
    pattern = r"^\s*(?:(?:an?|the)\s+)?(?:(?:photo|picture|image|rendering)\s+of\s+)?(?:(?:an?|the)\s+)?"
    return re.sub(pattern, "", instance_prompt, flags=re.IGNORECASE).strip() or None


def read_instance_images(folder) -> list[Image.Image]:
    folder = Path(folder)
    if not folder.is_dir():
        raise GraloraConfigError(f"--instance_data_dir {folder}: no such folder (give the folder of subject photos).")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise GraloraConfigError(f"--instance_data_dir {folder}: no images ({', '.join(IMAGE_SUFFIXES)}).")
    from .images import read_image  # the trainer's reader: the same pixels it trained on

    return [read_image(path) for path in paths]


def _instance_files(folder) -> list[Path]:
    folder = Path(folder) if folder is not None else None
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder is not None and folder.is_dir() else []


def build_scorers(instance_images, dino_model=DEFAULT_DINO_MODEL, clip_model=DEFAULT_CLIP_MODEL,
                  identifier: str | None = None, device=None, base_model: str | None = None) -> list:
    """DreamBooth's scorer (dino/clip None leaves that model out) plus the base's own (BASE_SCORERS)."""
    from importlib import import_module

    from .metrics import ClipEmbedder, DinoEmbedder, DreamBoothScorer

    if base_model in BASE_SCORERS:  # the base scores itself: default metric models it lacks are left out, said once
        skipped = [f"{flag} {name}" for flag, name, default in (("--dino_model", dino_model, DEFAULT_DINO_MODEL),
                                                                 ("--clip_model", clip_model, DEFAULT_CLIP_MODEL))
                   if name == default and not _available(name)]
        if skipped:
            dino_model = None if dino_model == DEFAULT_DINO_MODEL and not _available(dino_model) else dino_model
            clip_model = None if clip_model == DEFAULT_CLIP_MODEL and not _available(clip_model) else clip_model
            print(f"Scoring with {base_model}'s own evaluator: {' and '.join(skipped)} not in the Hugging Face cache "
                  "(download them once, or pass a folder, to add DINO/CLIP scores).")
    dino = DinoEmbedder(dino_model, device) if dino_model else None
    clip = ClipEmbedder(clip_model, device) if clip_model else None
    scorers = [DreamBoothScorer(instance_images, dino, clip, identifier)] if (dino or clip) else []
    if base_model in BASE_SCORERS:
        module, _, function = BASE_SCORERS[base_model].partition(":")
        scorers += list(getattr(import_module(module), function)(instance_images, device))
    return scorers


def _available(name: str) -> bool:
    """A metric model here without a download: a folder, or a Hub id in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return Path(str(name)).expanduser().is_dir() or isinstance(try_to_load_from_cache(str(name), "config.json"), str)


def instance_scorers(instance_images, instance_prompt, dino_model, clip_model, device=None, base_model=None) -> list:
    """`build_scorers` for a training run: its instance images (train.hf_dataset.reference_images), the
    identifier read from its instance prompt ('a photo of sks teapot' -> 'sks')."""
    subject = subject_of(instance_prompt)
    scorers = build_scorers(instance_images, dino_model, clip_model,
                            default_identifier(subject) if subject else None, device, base_model)
    if not scorers:
        raise GraloraConfigError(f"--dino_model and --clip_model are none and the base {base_model!r} has no scorers of "
                                 "its own (evaluate.BASE_SCORERS): nothing to score with; give a DINO or CLIP model.")
    return scorers


def generate_grid(pipe, prompts, seeds, steps, guidance=5.0, resolution=None, negative_prompt=None, progress=None):
    """[prompt][seed] images; the same CPU generator per seed for every variant, as generate.py does."""
    from .bases import render

    rows = []
    for prompt in prompts:
        row = []
        for seed in seeds:
            row.append(render(pipe, prompt, seed, steps, guidance, resolution, resolution, negative_prompt))
            if progress is not None:
                progress.update(1)
        rows.append(row)
    return rows


def score_images(scorers, images: list[list[Image.Image]], prompts: Sequence[str]) -> dict[str, float]:
    flat = [image for row in images for image in row]
    texts = [prompt for prompt, row in zip(prompts, images) for _ in row]
    metrics = {}
    for scorer in scorers:
        metrics.update({k: float(v) for k, v in scorer(flat, texts).items()})
    return metrics


def _labelled_sources(adapters) -> list[tuple[str, object]]:
    """Each adapter as (label, source): a bare path gets `adapter_label`; repeated labels get _2, _3."""
    pairs, seen = [], {BASE_LABEL: 1}
    for item in adapters:
        label, source = item if isinstance(item, tuple) else (adapter_label(item), item)
        seen[label] = seen.get(label, 0) + 1
        pairs.append((label if seen[label] == 1 else f"{label}_{seen[label]}", source))
    return pairs


def _check_inputs(prompts, seeds, steps, resolution, guidance=5.0) -> None:
    from .numbers import limited

    for seed in seeds:
        limited("seeds", seed, "--seeds")
    for name, value in (("steps", steps), ("resolution", resolution), ("guidance", guidance)):
        limited(name, value, f"--{name}")
    if not prompts:
        raise GraloraConfigError("No prompts: give --prompt / --prompts_file, or a --subject for the default set.")
    if not seeds:
        raise GraloraConfigError("No seeds: give at least one, e.g. --seeds 0,1.")
    if steps < 1:
        raise GraloraConfigError(f"--steps {steps}: at least 1.")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise GraloraConfigError(f"--resolution {resolution}: a positive multiple of 8 (the VAE downsamples by 8).")


def evaluate_adapter(
    base_model: str = "tiny",
    adapters: Sequence = (),
    instance_data_dir=None,
    instance_images: Sequence[Image.Image] | None = None,
    subject: str = "sks teapot",
    prompts: Sequence[str] | None = None,
    identifier: str | None = None,
    seeds: Sequence[int] = (0,),
    steps: int = 30,
    guidance: float = 5.0,
    resolution: int | None = None,
    negative_prompt: str | None = None,
    dino_model: str | None = DEFAULT_DINO_MODEL,
    clip_model: str | None = DEFAULT_CLIP_MODEL,
    scorers: list | None = None,
    include_base: bool = True,
    output_dir=None,
    json_path=None,
    pipe=None,
    device=None,
    dtype=None,
    progress=True,
    family: str | None = None,
    quantize_base: str = "none",
) -> EvaluationResult:
    """Score the base model alone (`include_base`) and each adapter alone on DreamBooth's metrics.

    adapters: GraLoRA or plain LoRA sources (file, folder, Hub id), or (label, source) pairs.
    Instance images: `instance_data_dir` or `instance_images`. Prompts default to DreamBooth's set for
    `subject`; CLIP-T reads each prompt without `identifier` (default: the subject's first word when it
    has two). `scorers`: callables `(images, prompts) -> {name: value}` replacing the default ones
    (`build_scorers`). `pipe`: an already loaded, patched pipeline instead of `base_model`. Writes
    `grid.png` and `results.json` into `output_dir` (and the JSON to `json_path`) when given.
    `quantize_base`: none, int8, nf4 or fp8, the base's weights as it loads (`bases.load_base`)."""
    from .bases import default_device_dtype, load_base
    from .sources import check_adapter_paths
    from .any_adapter import check_adapter_fits
    from .threads import announce

    prompts = list(prompts) if prompts else default_prompts(subject)
    identifier = default_identifier(subject) if identifier is None else identifier or None
    seeds, sources = list(seeds), _labelled_sources(adapters)
    _check_inputs(prompts, seeds, steps, resolution, guidance)
    announce(print if progress else None)  # the CPU thread rule, for Python callers too
    if instance_images is None:
        if instance_data_dir is None and scorers is None:
            raise GraloraConfigError("Give the instance images: --instance_data_dir FOLDER (the subject photos) or --dataset_name DATASET.")
        instance_images = read_instance_images(instance_data_dir) if instance_data_dir is not None else []
    check_adapter_paths([source for _, source in sources if isinstance(source, (str, Path))])
    inputs = [source for _, source in sources] + _instance_files(instance_data_dir)
    check_outputs(output_dir, json_path, inputs, instance_data_dir)  # before any model loads
    if scorers is None:  # before the (slow) base model: a missing metric model fails at once
        device = pipe.device if pipe is not None else default_device_dtype(device)[0]
        scorers = build_scorers(instance_images, dino_model, clip_model, identifier, device, base_model)
    with quiet_libraries():
        pipe = pipe if pipe is not None else load_base(base_model, family, device, dtype, quantize_base=quantize_base)[0]
        for label, source in sources:  # every adapter against the pipeline before any image (any_adapter.py)
            check_adapter_fits(pipe, source, base_model)
    columns = ([(BASE_LABEL, None)] if include_base else []) + sources
    bar = progress_bar(progress, len(columns) * len(prompts) * len(seeds), "evaluate")
    variants = []
    try:
        for i, (label, source) in enumerate(columns):
            variants.append(evaluate_variant(pipe, label, source, scorers, prompts, seeds, steps, guidance=guidance,
                                             resolution=resolution, negative_prompt=negative_prompt,
                                             adapter_name=f"evaluate_{i}", progress=bar))
    finally:
        if progress is True and bar is not None:
            bar.close()
    settings = {"instance_images": len(instance_images), "dino_model": dino_model and str(dino_model),
                "clip_model": clip_model and str(clip_model), "identifier": identifier, "guidance": guidance,
                "resolution": resolution}
    result = EvaluationResult(str(base_model), prompts, seeds, steps, variants, settings)
    return write_outputs(result, prompts, output_dir, json_path, inputs, instance_data_dir)


def evaluate_variant(pipe, label: str, source, scorers, prompts, seeds, steps: int, guidance: float = 5.0,
                     resolution=None, negative_prompt=None, adapter_name: str = "evaluate", progress=None) -> VariantResult:
    """One column: load the adapter `source` (None: the base alone), generate prompts x seeds, score,
    unload. The pipeline is as before afterwards."""
    from .any_adapter import loaded_adapter

    if progress is not None and hasattr(progress, "set_postfix_str"):
        progress.set_postfix_str(label)
    with quiet_libraries():  # diffusers' LoRA loading shows transformers' weight-loading bars
        with (loaded_adapter(pipe, source, adapter_name) if source is not None else contextlib.nullcontext()) as kind:
            images = generate_grid(pipe, prompts, seeds, steps, guidance, resolution, negative_prompt, progress)
    source_text = None if source is None else str(source) if isinstance(source, (str, Path)) else "<in memory>"
    return VariantResult(label, source_text, kind, score_images(scorers, images, prompts), images)


def is_results_json(path) -> bool:
    """A JSON file evaluate wrote (so `--json` may replace it): a small object with its keys."""
    try:
        if Path(path).stat().st_size > 50_000_000:
            return False
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"base_model", "prompts", "seeds", "variants"} <= set(data)


def check_outputs(output_dir=None, json_path=None, inputs=(), instance_data_dir=None, write: bool = False) -> None:
    """The output rule (outputs.py) for evaluate's grid, results.json and --json: never onto a file it
    reads (an adapter, a photo), never into the instance folder, never over a file it did not write."""
    from .outputs import check_output_file, claim_folder

    protected = [instance_data_dir] if instance_data_dir is not None else []
    inputs = [p for p in inputs if isinstance(p, (str, Path))]
    if output_dir is not None:
        claim_folder(output_dir, "evaluate", "--output_dir", protected=protected, own=re.compile(r"grid\.png"), write=write)
    if json_path is not None:
        check_output_file(json_path, "--json", inputs, protected, owned=is_results_json)


def _finite_or_none(value):
    """JSON has no NaN: a metric that could not be computed is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_outputs(result: EvaluationResult, prompts, output_dir=None, json_path=None, inputs=(),
                  instance_data_dir=None) -> EvaluationResult:
    """`output_dir`: grid.png and results.json; `json_path`: the JSON (also) there. Through the output
    rule (`check_outputs`) and the atomic writer."""
    from .atomic import atomic_write

    check_outputs(output_dir, json_path, inputs, instance_data_dir, write=True)
    paths = [Path(json_path)] if json_path is not None else []
    if output_dir is not None:
        output_dir = Path(output_dir)
        result.grid = output_dir / "grid.png"
        save_grid(labelled_variant_grid(result.variants, prompts), result.grid)
        paths.append(output_dir / "results.json")
    text = json.dumps(_finite_or_none(result.to_dict()), indent=2, allow_nan=False) + "\n"
    for path in paths:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    result.json_path = paths[0] if paths else None
    return result


def format_table(result: EvaluationResult) -> str:
    """One row per variant, one column per metric (DreamBooth's first), 3 decimals."""
    names = [m for m in ("dino", "clip_i", "clip_t") if any(m in v.metrics for v in result.variants)]
    names += sorted({m for v in result.variants for m in v.metrics} - set(names))
    width = max([len("variant")] + [len(v.name) for v in result.variants])
    widths = [max(8, len(n)) for n in names]  # a long metric name widens its column, not the row
    lines = [f"{'variant':<{width}}  {'kind':<7}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for v in result.variants:
        values = [v.metrics.get(n, math.nan) for n in names]
        lines.append(f"{v.name:<{width}}  {v.kind or '-':<7}  " + "  ".join(f"{x:>{w}.3f}" for x, w in zip(values, widths)))
    return "\n".join(lines)
