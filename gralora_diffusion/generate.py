"""Generate samples with GraLoRA (or plain LoRA) adapters: prompts x seeds x adapter scales, each
image saved and one labelled grid (rows: prompt/seed, columns: scale).

The scale sweep multiplies every loaded adapter's weight: unfused it goes through diffusers' own
`cross_attention_kwargs={"scale": s}` (UNet and, via `lora_scale`, both text encoders); with `fuse`
the adapters are fused at scale s for the column and unfused after it. GraLoRA adapters alone go
through the `*_gralora` methods (exact unfuse); with a LoRA among them, through diffusers'
`set_adapters` / `fuse_lora`, which act on both kinds.

The output folder is marked (`MARKER`) when generate makes it; a folder holding images or captions
generate did not write (a training set) is refused before anything loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .bases import TINY
from .constants import GENERATE_OUTPUT_DIR as DEFAULT_OUTPUT_DIR
from .errors import GraloraConfigError
from .grids import labelled_grid, save_grid  # noqa: F401  (labelled_grid: re-exported, older imports)
from .numbers import limited
from .outputs import OWNER_FILE, claim_folder, mark_folder, owner

if TYPE_CHECKING:  # PIL only for the annotations: importing this module stays cheap
    from PIL import Image

MARKER = OWNER_FILE  # in every folder generate writes to (outputs.py): the images beside it are ours
OUR_IMAGE = re.compile(r"(grid|\d{2,}_[a-z0-9-]+_seed-?\d+(_a\d+)?_scale[-+.0-9a-z]+)\.png")


@dataclass
class GenerateResult:
    output_dir: Path
    grid: Path
    images: list[Path] = field(default_factory=list)  # row-major: (prompt, seed) rows, scale columns
    rows: list[tuple[str, int]] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    adapters: dict[str, float] = field(default_factory=dict)  # adapter name -> weight
    columns: list[str] = field(default_factory=list)  # grid column labels


def parse_adapter(text: str) -> tuple[str, float]:
    """'path/to/adapter:0.8' -> ('path/to/adapter', 0.8); no number after the last ':' -> weight 1."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise GraloraConfigError(f"--scales {text!r}: give numbers separated by commas, e.g. 0,0.5,1.0.") from None
    if not scales:
        raise GraloraConfigError("--scales is empty; give at least one scale, e.g. 1.0.")
    return scales


def scale_labels(scales) -> list[str]:
    """Short labels (`:g`, 6 digits) unless two scales would share one; then as many digits as it takes,
    so every scale gets its own file name (0.5 and 0.5000001 differ)."""
    for digits in range(6, 18):
        labels = [f"{s:.{digits}g}" for s in scales]
        if len(set(labels)) == len(labels):
            return labels
    return [repr(float(s)) for s in scales]


def read_prompts(path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    if not Path(path).is_file():
        raise GraloraConfigError(f"--prompts_file {path}: no such file (one prompt per line).")
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise GraloraConfigError(f"--prompts_file {path}, line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x}); "
                                 "save the file as UTF-8.") from None
    lines = [line.strip() for line in text.splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise GraloraConfigError(f"{path}: no prompts (one per line; # starts a comment).")
    return prompts


NO_ADAPTER = ("none", "base")  # a prompts file's adapter column: this prompt's images without adapter


def prompt_adapters(prompts: list[str], adapters: list[str], pair_in_order: bool) -> tuple[list[str], list | None]:
    """(prompts, per-prompt adapter index or None) for `--per_image_adapters` and a prompts file's adapter
    column (`prompt<TAB>adapter`: its --adapter number from 1, its --adapter path as given, or none/base).
    Without a column, `pair_in_order` pairs prompt i with adapter i. None: no per-image adapters."""
    rows = [prompt.split("\t") for prompt in prompts]
    if not any(len(row) > 1 for row in rows):
        if not pair_in_order:
            return prompts, None
        if len(prompts) != len(adapters):
            raise GraloraConfigError(f"--per_image_adapters pairs prompt i with --adapter i, but there are {len(prompts)} "
                                     f"prompts and {len(adapters)} adapters; give as many, or an adapter column in --prompts_file.")
        return prompts, list(range(len(adapters)))
    paths = [parse_adapter(a)[0] for a in adapters]
    out, chosen = [], []
    for prompt, *ref in rows:
        ref = ref[0].strip() if ref else ""
        if len(ref.split("\t")) > 1 or not ref:
            raise GraloraConfigError(f"prompt {prompt!r}: no adapter in its column; every line needs `prompt<TAB>adapter` "
                                     f"(the --adapter number 1..{len(adapters)}, its path, or none) once one line has one.")
        if ref.lower() in NO_ADAPTER:
            index = None
        elif ref.isdigit() and 1 <= int(ref) <= len(adapters):
            index = int(ref) - 1
        elif ref in paths:
            index = paths.index(ref)
        else:
            raise GraloraConfigError(f"prompt {prompt!r}: adapter {ref!r} is not one of the --adapter options "
                                     f"(numbers 1..{len(adapters)}: {paths}) nor none.")
        out.append(prompt.strip())
        chosen.append(index)
    return out, chosen


def check_output_dir(output_dir) -> None:
    """The output rule (outputs.claim_folder) for generate: a new or empty folder, or one generate made
    before; a file, another command's folder, or a folder holding images or captions generate did not
    write (a training set) is refused. Nothing is written here."""
    claim_folder(output_dir, "generate", "output_dir", own=OUR_IMAGE, write=False)


def _replace_earlier_images(output_dir: Path, say) -> None:
    """generate's own folder again: the images an earlier run wrote go, so a grid never sits beside
    another run's images (outputs never mix). Only files generate names and made (OUR_IMAGE, marked)."""
    if owner(output_dir) != "generate":
        return
    earlier = [p for p in output_dir.iterdir() if p.is_file() and not p.is_symlink() and OUR_IMAGE.fullmatch(p.name)]
    for path in earlier:
        path.unlink()
    if earlier and say:
        say(f"Replaced {len(earlier)} images an earlier generate run wrote in {output_dir}/")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def _activate(pipe, names, weights, lora: bool, scale: float, fuse: bool) -> dict:
    """Set the adapters' weights for one column and fuse at `scale`, or return the per-call scale."""
    if not names:
        return {}
    if lora:  # diffusers' own calls act on GraLoRA and LoRA layers alike
        pipe.set_adapters(names, weights)  # again per column: diffusers resets weights after scale 0
    else:
        pipe.set_gralora_adapters(names, weights)
    if not fuse:
        return {"scale": scale}
    if lora:
        pipe.fuse_lora(lora_scale=scale, adapter_names=names)
    else:
        pipe.fuse_gralora(gralora_scale=scale, adapter_names=names)
    return {}


def _columns(adapters, names, weights, scales, side_by_side: bool) -> list[tuple[list, list, float, str, str]]:
    """(adapter names, weights, scale, grid label, file-name part) per grid column: every adapter
    together per scale, or side by side each adapter alone per scale."""
    labels = scale_labels(scales)
    if not side_by_side or len(names) < 2:
        return [(names, weights, s, f"scale {label}", f"scale{label}") for s, label in zip(scales, labels)]
    from .grids import adapter_label

    return [([name], [weight], s, f"{adapter_label(path)} {label}", f"a{i}_scale{label}")
            for i, (name, weight, (path, _)) in enumerate(zip(names, weights, adapters)) for s, label in zip(scales, labels)]


def _check_settings(prompts, seeds, scales, steps, height, width, guidance=5.0) -> None:
    for name, values in (("seeds", seeds), ("scales", scales)):
        for value in values:
            limited(name, value, f"--{name}")
    for name, value in (("steps", steps), ("height", height), ("width", width), ("guidance", guidance)):
        limited(name, value, f"--{name}")
    if not prompts:
        raise GraloraConfigError("No prompts: give --prompt or --prompts_file.")
    if not seeds or not scales:
        raise GraloraConfigError("Give at least one seed and one scale.")
    for name, values in (("--seeds", seeds), ("--scales", scales)):
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        if repeated:
            raise GraloraConfigError(f"{name} lists {repeated[0]:g} more than once; each value gives its own images, list it once.")
    if steps < 1:
        raise GraloraConfigError(f"steps={steps}: at least 1.")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value < 8 or value % 8):
            raise GraloraConfigError(f"{name}={value}: must be a positive multiple of 8 (the VAE downsamples by 8).")


def generate_samples(
    base_model: str = TINY,
    adapters: list[tuple[str, float]] = (),
    prompts: list[str] = ("a photo of sks teapot",),
    output_dir=DEFAULT_OUTPUT_DIR,
    negative_prompt: str | None = None,
    seeds: list[int] = (0,),
    steps: int = 30,
    guidance: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    scales: list[float] = (1.0,),
    fuse: bool = False,
    device=None,
    dtype=None,
    pipe=None,
    progress: bool = True,
    side_by_side: bool = False,
    per_image_adapters: list | None = None,
    family: str | None = None,
    scheduler: str | None = None,
    init_image=None,
    strength: float = 0.8,
    quantize_base: str = "none",
) -> GenerateResult:
    """Load the base model and adapters (`(path or repo id, weight)`; GraLoRA or plain LoRA files),
    generate every prompt x seed x scale, save each image and `grid.png` into `output_dir` (new, empty
    or written by generate before). `pipe`: an already loaded pipeline (with `patch_pipeline`) instead
    of `base_model`. `progress`: a loading line and a bar over the images (False: silent). `side_by_side`:
    a column per adapter (alone) and scale, e.g. a GraLoRA adapter beside its LoRA baseline.
    `per_image_adapters`: per prompt, the index of its adapter in `adapters` (None: the base); all prompts of
    a seed and scale then go in one batch, each image with its own GraLoRA adapter (`gralora_adapter_names`).
    `family`: the base's family when model_index.json does not say it (or `tiny` of another family than sdxl).
    `scheduler`: a diffusers scheduler class name (schedulers.py). `init_image`: a picture (path or PIL
    image) to start from, image-to-image through diffusers' `AutoPipelineForImage2Image.from_pipe` (the
    same modules, adapters included), `strength` of noise added to it (0 < strength <= 1).
    `quantize_base`: none, int8, nf4 or fp8, the base's weights as it loads (`bases.load_base`)."""
    from .any_adapter import LORA, check_adapter_fits, load_any_adapter
    from .bases import load_base, render
    from .quiet import progress_bar, quiet_known_noise, quiet_libraries
    from .sources import check_adapter_paths

    _check_settings(prompts, seeds, scales, steps, height, width, guidance)
    if scheduler is not None:
        from .schedulers import scheduler_class

        scheduler_class(scheduler)  # the name, before any model loads
    if init_image is not None:
        init_image = _init_image(init_image, strength)
    for path, weight in adapters:  # the number rule before anything loads (the loader checks it again)
        limited("weight", weight, f"--adapter {path}:weight")
    check_output_dir(output_dir)
    check_adapter_paths([path for path, _ in adapters])
    if per_image_adapters is not None:
        _check_per_image(per_image_adapters, prompts, adapters, fuse, side_by_side, init_image)
    if pipe is None:
        pipe, _ = load_base(base_model, family, device, dtype, say=print if progress else None, quantize_base=quantize_base)
    names = [f"adapter_{i}" for i in range(len(adapters))]
    for path, _ in adapters:  # every adapter against the base before any loads (its recorded base named on a mismatch)
        check_adapter_fits(pipe, path, base_model)
    with quiet_libraries():  # a LoRA's text encoders show transformers' weight-loading bars
        kinds = [load_any_adapter(pipe, path, name) for name, (path, _) in zip(names, adapters)]
    runner, extra = _runner(pipe, scheduler, init_image, strength, height, width)
    lora, weights = LORA in kinds, [float(w) for _, w in adapters]  # each checked by load_any_adapter's loader
    if per_image_adapters is not None and lora:
        raise GraloraConfigError(f"--per_image_adapters: {adapters[kinds.index(LORA)][0]} is a plain LoRA; per-image "
                                 "adapters are GraLoRA adapters only.")
    output_dir = Path(output_dir)
    claim_folder(output_dir, "generate", "output_dir", own=OUR_IMAGE, write=False)  # again: it may have changed meanwhile
    _replace_earlier_images(output_dir, print if progress else None)
    mark_folder(output_dir, "generate")
    rows, columns = [(p, s) for p in prompts for s in seeds], _columns(adapters, names, weights, scales, side_by_side)
    paths = [output_dir / f"{r // len(seeds):02d}_{_slug(p)}_seed{s}_{tag}.png" for r, (p, s) in enumerate(rows) for *_, tag in columns]
    result = GenerateResult(output_dir, output_dir / "grid.png", paths, rows, list(scales), dict(zip(names, weights)),
                            [column[3] for column in columns])
    images = [[None] * len(columns) for _ in rows]
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))  # a caller's pipeline: its bar off inside ours
    pipe.set_progress_bar_config(disable=True)
    runner.set_progress_bar_config(disable=True)
    bar = progress_bar(progress, len(rows) * len(columns), "generate")
    try:
        for c, (active, active_weights, scale, *_) in enumerate(columns):
            with quiet_libraries():
                kwargs = _activate(pipe, active, active_weights, lora, scale, fuse)
            try:
                for r, (prompt, seed) in enumerate(rows):
                    if per_image_adapters is not None:  # a seed's prompts in one batch, made at its first prompt
                        if r < len(seeds):
                            made = _per_image_batch(pipe, prompts, [None if i is None else names[i] for i in per_image_adapters],
                                                    seed, negative_prompt=negative_prompt, num_inference_steps=steps,
                                                    guidance_scale=guidance, height=height, width=width, **kwargs)
                            for p, image in enumerate(made):
                                images[p * len(seeds) + r][c] = image
                        save_image(images[r][c], result.images[r * len(columns) + c])
                        if bar is not None:
                            bar.update(1)
                        continue
                    with quiet_known_noise():  # an fp16 VAE's upcast talks; a cut prompt still says so
                        images[r][c] = render(runner, prompt, seed, steps, guidance, height, width, negative_prompt,
                                              **kwargs, **extra)
                    save_image(images[r][c], result.images[r * len(columns) + c])  # as it comes: a stopped run keeps what it made
                    if bar is not None:
                        bar.update(1)
            finally:
                if names and fuse:
                    pipe.unfuse_lora() if lora else pipe.unfuse_gralora()
    finally:
        pipe.set_progress_bar_config(**saved_bar)
        if progress is True and bar is not None:
            bar.close()
    row_labels = [f"{prompt} (seed {seed})" for prompt, seed in rows]
    if per_image_adapters is not None:
        from .evaluate import adapter_label

        label = ["base" if i is None else adapter_label(adapters[i][0]) for i in per_image_adapters]
        row_labels = [f"{text} [{label[r // len(seeds)]}]" for r, text in enumerate(row_labels)]
    save_grid(labelled_grid(images, row_labels, result.columns), result.grid)
    return result


def _init_image(image, strength: float):
    """--init_image read by the one image reader (images.py), and --strength checked, before any model loads."""
    from .images import read_image

    if not 0 < float(strength) <= 1:
        raise GraloraConfigError(f"--strength {strength}: give a number in (0, 1]; 1 draws over the picture entirely.")
    return image.convert("RGB") if hasattr(image, "convert") else read_image(image)


def _runner(pipe, scheduler, init_image, strength, height, width):
    """(the pipeline that draws, its extra call arguments): `pipe` itself, or its image-to-image twin
    sharing every module (diffusers' `from_pipe`); with `scheduler` swapped in."""
    if scheduler is not None:
        from .schedulers import use_scheduler

        use_scheduler(pipe, scheduler)  # on the pipeline: an image-to-image twin made after shares it
    if init_image is None:
        return pipe, {}
    from diffusers import AutoPipelineForImage2Image

    from .quiet import quiet_libraries

    try:
        with quiet_libraries():
            runner = AutoPipelineForImage2Image.from_pipe(pipe)
    except ValueError as err:
        raise GraloraConfigError(f"--init_image: diffusers has no image-to-image pipeline for {type(pipe).__name__} "
                                 f"({str(err).splitlines()[0][:200]}).") from None
    side = getattr(pipe, "default_sample_size", None)
    size = (width or (side * pipe.vae_scale_factor if side else init_image.width),
            height or (side * pipe.vae_scale_factor if side else init_image.height))
    return runner, {"image": init_image.resize(size), "strength": float(strength)}


def _check_per_image(indices, prompts, adapters, fuse: bool, side_by_side: bool, init_image=None) -> None:
    if fuse or side_by_side or init_image is not None:
        other = "--fuse" if fuse else "--side_by_side" if side_by_side else "--init_image"
        raise GraloraConfigError("--per_image_adapters gives each prompt its own adapter in one batch; it does not go "
                                 f"with {other}.")
    if len(indices) != len(prompts) or any(i is not None and not 0 <= i < len(adapters) for i in indices):
        raise GraloraConfigError(f"per_image_adapters={indices}: one adapter index (0..{len(adapters) - 1}) or None per prompt.")


def _per_image_batch(pipe, prompts, names, seed: int, **kwargs) -> list:
    """One call for all prompts, image i with adapter names[i]; each image's latents from its own generator
    seeded `seed`, so it is the image a call with its prompt alone would give."""
    import torch

    from .quiet import quiet_known_noise
    from .schedulers import check_steps

    check_steps(pipe, kwargs["num_inference_steps"])
    with quiet_known_noise():
        return pipe(prompt=list(prompts), generator=[torch.Generator(device="cpu").manual_seed(seed) for _ in prompts],
                    gralora_adapter_names=names, **kwargs).images


def save_image(image: Image.Image, path) -> None:
    """A PNG written atomically (the output rule's writer): a stopped run leaves no half image."""
    from .atomic import atomic_write

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
