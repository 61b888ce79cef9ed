"""Generate samples with GraLoRA adapters: prompts x seeds x adapter scales, each image saved and one
labelled grid (rows: prompt/seed, columns: scale).

The scale sweep multiplies every loaded adapter's weight: unfused it goes through diffusers' own
`cross_attention_kwargs={"scale": s}` (UNet and, via `lora_scale`, both text encoders); with `fuse`
the adapters are fused at scale s for the column and unfused after it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .constants import torch_dtype
from .errors import GraloraConfigError

TINY = "tiny"
WORLD = "world"  # the tiny SDXL pretrained on the drawn world (gralora_diffusion.world)
LABEL_WIDTH = 192  # row labels (prompt, seed) left of the grid
HEADER_HEIGHT = 24  # column labels (scale) above it


@dataclass
class GenerateResult:
    output_dir: Path
    grid: Path
    images: list[Path] = field(default_factory=list)  # row-major: (prompt, seed) rows, scale columns
    rows: list[tuple[str, int]] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    adapters: dict[str, float] = field(default_factory=dict)  # adapter name -> weight


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


def read_prompts(path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    if not Path(path).is_file():
        raise GraloraConfigError(f"--prompts-file {path}: no such file (one prompt per line).")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise GraloraConfigError(f"{path}: no prompts (one per line; # starts a comment).")
    return prompts


def default_device_dtype(device=None, dtype=None) -> tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is not None:
        dtype = torch_dtype(dtype)
    return device, dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)


def check_adapter_paths(paths) -> None:
    """Local adapters that do not exist fail before the (slow) base model loads."""
    from .errors import AdapterFileError
    from .loader import _looks_like_path

    for path in paths:
        if isinstance(path, (str, os.PathLike)) and not Path(path).expanduser().exists() and _looks_like_path(str(path)):
            raise AdapterFileError(f"{path}: no such adapter file or folder (and not a Hub repo id).")


def load_base_pipeline(base_model: str, device=None, dtype=None):
    """`tiny` (the embedded random-weights SDXL), `world` (the embedded pretrained one), a Hub id or a local
    folder; with the GraLoRA methods."""
    from .loader import patch_pipeline

    device, dtype = default_device_dtype(device, dtype)
    if base_model not in (TINY, WORLD):
        from .train.config import check_model_path

        check_model_path("--base", str(base_model), "model_index.json", GraloraConfigError)
    if base_model == TINY:
        from .tiny import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(seed=0)
    elif base_model == WORLD:
        from .world.model import tiny_world_pipeline

        pipe = tiny_world_pipeline()
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(base_model, torch_dtype=dtype)
    pipe.to(device)
    if pipe.dtype != dtype:  # only the tiny and world models get here (from_pretrained loaded the dtype)
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return patch_pipeline(pipe)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def labelled_grid(images: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """Rows x columns of equal-size images, a label column on the left and a header row on top."""
    w, h = images[0][0].size
    grid = Image.new("RGB", (LABEL_WIDTH + w * len(column_labels), HEADER_HEIGHT + h * len(row_labels)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for c, label in enumerate(column_labels):
        draw.text((LABEL_WIDTH + c * w + 4, 6), label, fill="black", font=font)
    for r, (row, label) in enumerate(zip(images, row_labels)):
        lines = _wrap(draw, label, font, LABEL_WIDTH - 8)[: max(1, (h - 4) // 12)]
        for i, line in enumerate(lines):
            draw.text((4, HEADER_HEIGHT + r * h + 4 + 12 * i), line, fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image, (LABEL_WIDTH + c * w, HEADER_HEIGHT + r * h))
    return grid


def generate_samples(
    base_model: str = TINY,
    adapters: list[tuple[str, float]] = (),
    prompts: list[str] = ("a photo of sks teapot",),
    output_dir="samples",
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
) -> GenerateResult:
    """Load the base model and adapters (`(path or repo id, weight)`), generate every prompt x seed x
    scale, save each image and `grid.png` into `output_dir`. `pipe`: an already loaded pipeline
    (with `patch_pipeline`) instead of `base_model`."""
    if not prompts:
        raise GraloraConfigError("No prompts: give --prompt or --prompts-file.")
    if not seeds or not scales:
        raise GraloraConfigError("Give at least one seed and one scale.")
    if steps < 1:
        raise GraloraConfigError(f"steps={steps}: at least 1.")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value < 8 or value % 8):
            raise GraloraConfigError(f"{name}={value}: must be a positive multiple of 8 (the VAE downsamples by 8).")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise GraloraConfigError(f"output_dir {output_dir}: is a file, not a folder; give a folder path (created if missing).")
    check_adapter_paths([path for path, _ in adapters])
    if pipe is None:
        pipe = load_base_pipeline(base_model, device, dtype)
    names = [pipe.load_gralora_weights(path, adapter_name=f"adapter_{i}") for i, (path, _) in enumerate(adapters)]
    weights = [float(w) for _, w in adapters]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = [(p, s) for p in prompts for s in seeds]
    paths = [output_dir / f"{r // len(seeds):02d}_{_slug(p)}_seed{s}_scale{c:g}.png" for r, (p, s) in enumerate(rows) for c in scales]
    result = GenerateResult(output_dir, output_dir / "grid.png", paths, rows, list(scales), dict(zip(names, weights)))
    images = [[None] * len(scales) for _ in rows]
    for c, scale in enumerate(scales):
        kwargs = {}
        if names:
            pipe.set_gralora_adapters(names, weights)  # again per column: diffusers resets weights after scale 0
            if fuse:
                pipe.fuse_gralora(gralora_scale=scale, adapter_names=names)
            else:
                kwargs["cross_attention_kwargs"] = {"scale": scale}
        try:
            for r, (prompt, seed) in enumerate(rows):
                images[r][c] = pipe(
                    prompt,
                    negative_prompt=negative_prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=height,
                    width=width,
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                    **kwargs,
                ).images[0]
                images[r][c].save(result.images[r * len(scales) + c])  # as it comes: a stopped run keeps what it made
        finally:
            if names and fuse:
                pipe.unfuse_gralora()
    labels = [f"{prompt} (seed {seed})" for prompt, seed in rows]
    labelled_grid(images, labels, [f"scale {s:g}" for s in scales]).save(result.grid)
    return result
