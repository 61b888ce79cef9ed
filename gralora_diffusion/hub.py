"""Share an adapter: a Hub model card (huggingface_hub.ModelCard) and a push (create_repo + upload_folder).

What goes up is an explicit list of regular files inside the folder (`push_plan`): the adapter file,
README.md (the card), the images directly in `samples/` (the only images the card generator shows; the
card's text is never scanned for links), and optionally the exact LoRA export
(`pytorch_lora_weights.safetensors`, loadable with stock `load_lora_weights`). A symbolic link, or a
path whose real location leaves the folder, is refused and listed, never followed. Nothing else in the
folder (photos, class images, checkpoints, logs, optimizer state) is uploaded, whatever its name or
depth, and nothing local is ever deleted. User text in the card (prompts, ids, paths) is escaped:
Markdown (`md`), YAML (huggingface_hub's yaml dump), Python and shell literals in its code blocks.
"""

from __future__ import annotations

import json
import re
import shlex
import stat
import urllib.parse
from pathlib import Path

from .adapter_file import atomic_write, read_adapter_file
from .constants import CARD_NAME, IMAGE_SUFFIXES, WEIGHT_NAME
from .constants import LORA_WEIGHT_NAME as DIFFUSERS_WEIGHT_NAME
from .bases import DEFAULT_FAMILY, get_family
from .errors import AdapterFileError, HubError
from .export import export_lora, format_size
from .info import adapter_info
from .recorded_base import hub_id

TAGS = ["gralora", "text-to-image", "diffusers", "template:sd-lora"]  # and the family's model tag (FAMILY_TAGS)
LORA_TAGS = ["lora", "gralora-diffusion", "text-to-image", "diffusers", "template:sd-lora"]  # and the family's tag
FAMILY_TAGS = {"sd15": "stable-diffusion", "sdxl": "stable-diffusion-xl", "sd3": "sd3", "flux": "flux", "flux2-klein": "flux2",
               "qwen-image": "qwen-image"}


def _sample_images(folder: Path) -> list[str]:
    """Regular image files in the `samples/` subfolder (what training writes), relative paths, sorted
    (grids last). Not the folder itself: a user's own photos may lie there, and the card must not show
    them. Links and anything outside the folder are left out (`push_plan`)."""
    rel = [name for name in push_plan(folder)[0] if name.startswith("samples/")]
    return [r for r in rel if "grid" not in Path(r).name] + [r for r in rel if "grid" in Path(r).name]


def _inside_regular_file(folder: Path, name: str) -> str | None:
    """None when `folder/name` is a regular file inside `folder` reached through no symbolic link; else why not."""
    path, root = folder / name, folder.resolve()
    for part in [path, *path.parents]:
        if part == folder:
            break
        if part.is_symlink():
            return f"{part.relative_to(folder).as_posix()} is a symbolic link"
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return "missing"
    if not real.is_relative_to(root):
        return f"its real path {real} is outside {folder}"
    if not stat.S_ISREG(path.lstat().st_mode):
        return "not a regular file"
    return None


def push_plan(folder, include_lora_export: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """(files a push uploads, [(file, why it is refused)]). Candidates: the adapter, README.md (the
    card), the images directly in `samples/` (the card shows only those: it is never scanned for links),
    and the LoRA export when asked. Each must be a regular file whose real path is inside the folder,
    reached through no symbolic link: links (to anywhere) and paths leaving the folder are refused."""
    folder = Path(folder)
    candidates = [adapter_in(folder)[0].name, CARD_NAME]
    samples = folder / "samples"
    if samples.is_dir():
        candidates += [f"samples/{p.name}" for p in sorted(samples.iterdir())
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    if include_lora_export:
        candidates.append(DIFFUSERS_WEIGHT_NAME)
    files, refused = [], []
    for name in dict.fromkeys(candidates):
        why = _inside_regular_file(folder, name)
        if why is None:
            files.append(name)
        elif why != "missing":
            refused.append((name, why))
    return files, refused


def adapter_in(folder: Path) -> tuple[Path, str]:
    """(file, kind) of the adapter a training output folder holds: the GraLoRA file, else the
    `--adapter lora` baseline's diffusers LoRA file. Checked before anything is sent: a folder with
    neither, or a broken file, is refused naming it."""
    from .any_adapter import LORA, safetensors_kind

    lora = folder / DIFFUSERS_WEIGHT_NAME
    if not (folder / WEIGHT_NAME).is_file() and lora.is_file():
        if safetensors_kind(lora) != LORA:
            raise AdapterFileError(f"{lora}: not a LoRA safetensors file (no lora_A/lora_B keys could be read); "
                                   "give the --output_dir of a training run.")
        return lora, "lora"
    read_adapter_file(folder / WEIGHT_NAME)  # names the problem: no such file, damaged, ...
    return folder / WEIGHT_NAME, "gralora"


def files_to_push(folder, include_lora_export: bool = False) -> list[str]:
    """The exact files a push uploads, relative to `folder`: adapter, card, the regular images directly
    in `samples/`, and the LoRA export when asked; never a link nor a file outside the folder."""
    return push_plan(folder, include_lora_export)[0]


_MD_SPECIAL = re.compile(r"([\\`\[\]()<!|])")  # what makes links, images, HTML, code or table cells


def md(text) -> str:
    """User text (a prompt, an id, a path) as literal Markdown: the characters that make links, images,
    HTML, code spans or table cells escaped, line breaks made spaces; `![x](photos/me.png)` shows as
    text and links to nothing."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _fence(code: str) -> str:
    """A code fence longer than any run of backticks in `code`, so no text can close it early."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    return "`" * max(3, longest + 1)


def _table(rows: dict) -> str:
    lines = ["| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {md(json.dumps(v) if isinstance(v, (dict, list)) else v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def save_model_card(
    folder,
    repo_id: str | None = None,
    base_model: str | None = None,
    instance_prompt: str | None = None,
    images: list[str] | None = None,
    prompts: list[str] | None = None,
    license: str = "openrail++",
    training: dict | None = None,
    grid: str | None = None,
    family: str | None = None,
) -> Path:
    """Write `folder/README.md`: Hub YAML front matter (base_model, library_name: diffusers, license,
    tags, instance_prompt, widget) and a body (load with `load_gralora_weights`, export to LoRA,
    adapter and training settings, sample grid). Unset fields come from the adapter file's header
    (`base_model`, `instance_prompt`, `training`, the family) and the images found in the folder; `family`
    names the base's family where the file does not (a diffusers LoRA file records none)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    source, kind = adapter_in(folder)
    info = adapter_info(source)
    family = get_family(family or info.get("family") or DEFAULT_FAMILY)
    recorded_id = None  # the Hub id the trainer found for a local base (a folder in the HF cache)
    if kind == "gralora":
        adapter = read_adapter_file(source)
        base_model = base_model or adapter.base_model
        recorded_id = adapter.metadata.get("base_model_hub_id")
        instance_prompt = instance_prompt or adapter.metadata.get("instance_prompt")
        if training is None and adapter.metadata.get("training"):
            training = json.loads(adapter.metadata["training"])
    else:
        base_model = base_model or info["base_model"]
    # the card's base_model is a Hub model id or nothing, never a local path, `tiny` or `world`; the text and
    # code name the id when there is one, else the base as recorded
    base_id = hub_id(base_model) or recorded_id
    base_model = base_id or base_model
    images = _sample_images(folder) if images is None else [Path(i).as_posix() for i in images]
    if grid is None:
        grid = next((i for i in images if "grid" in Path(i).name), None)
    samples = [i for i in images if i != grid]
    # prompts as CLIP's tokenizer reads them (whitespace runs are one space): no line of the YAML front
    # matter can then read `---` and end it early
    instance_prompt = " ".join(instance_prompt.split()) if instance_prompt else instance_prompt
    prompts = [" ".join(str(p).split()) for p in prompts] if prompts else [instance_prompt or ""] * len(samples)
    if len(prompts) != len(samples):
        raise HubError(f"{len(prompts)} prompts for {len(samples)} sample images; give one prompt per image.")
    name = repo_id or folder.resolve().name
    where = repo_id or str(folder)

    data = ModelCardData(
        base_model=base_id,
        library_name="diffusers",
        license=license,
        tags=[*(TAGS if kind == "gralora" else LORA_TAGS)[:-2], FAMILY_TAGS.get(family.name, family.name), *TAGS[-2:]],
        instance_prompt=instance_prompt,
        widget=[{"text": p, "output": {"url": i}} for p, i in zip(prompts, samples)] or None,
    )
    if kind == "gralora":
        body = _card_body(name, where, base_model, instance_prompt, grid, _adapter_rows(info), training,
                          info["components"].get(family.denoiser, {}).get("k", "k"), family)
    else:
        body = _lora_card_body(name, where, base_model, instance_prompt, grid, info, training, family)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = folder / CARD_NAME
    atomic_write(path, lambda tmp: card.save(tmp))
    return path


def _adapter_rows(info: dict) -> dict:
    """The card's adapter table, from `adapter_info`."""
    adapter_rows = {
        f"{c} (r / k / hybrid_r / alpha)": f"{v['r']} / {v['k']} / {v['hybrid_r']} / {v['alpha']:g}" for c, v in info["components"].items()
    }
    adapter_rows.update({
        "targets": json.dumps({c: v["targets"] for c, v in info["components"].items()}),
        "adapted modules": sum(v["modules"] for v in info["components"].values()),
        "parameters": f"{info['params']:,}",
        "file": f"{WEIGHT_NAME} ({format_size(info['file_size'])}, {info['dtype']})",
        "exact LoRA export": f"rank {', '.join(f'{c} {r}' for c, r in info['lora_export']['rank'].items())}, "
                             f"about {format_size(info['lora_export']['size_bytes'])}",
    })
    return adapter_rows


def _card_body(name, where, base_model, instance_prompt, grid, adapter_rows: dict, training, k, family) -> str:
    """The GraLoRA card's Markdown below the front matter."""
    from .bases import scale_kwargs

    base, pipeline_class, dtype, py_base, py_where, py_prompt = _usage_values(where, base_model, instance_prompt, family)
    scale_kwarg = next(iter(scale_kwargs(family.pipeline_class, 1.0)))
    sh_where = shlex.quote(where)
    py_code = f"""import torch
from diffusers import {pipeline_class}
import gralora_diffusion as gd

pipe = {pipeline_class}.from_pretrained({py_base}, torch_dtype=torch.{dtype}).to("cuda")
gd.patch_pipeline(pipe)
pipe.load_gralora_weights({py_where})
image = pipe(prompt={py_prompt}, {scale_kwarg}={{"scale": 1.0}}).images[0]"""
    sh_code = f"""gralora-diffusion export-lora {sh_where} lora.safetensors                    # diffusers keys, exact
gralora-diffusion export-lora {sh_where} lora_kohya.safetensors --format kohya   # ComfyUI / A1111 keys, exact
gralora-diffusion export-lora {sh_where} lora_r16.safetensors --svd_rank 16      # smaller, SVD-truncated"""
    intro = f"""A [GraLoRA](https://arxiv.org/abs/2505.20355) adapter for {md(base)}, made with gralora-diffusion.{_trigger(instance_prompt)}
GraLoRA splits each adapted weight into a {k}×{k} grid of blocks, each with its own low-rank adapter:
the parameters of LoRA rank r, an update of rank up to k·r."""
    export = ("Export to plain LoRA (ComfyUI, A1111, stock diffusers)",
              "A GraLoRA update is exactly a LoRA of rank k·r + hybrid_r, so this export loses nothing:", sh_code,
              f"""Where the repository holds `{DIFFUSERS_WEIGHT_NAME}` (pushed with `--include_lora_export`), stock
diffusers loads it directly with `pipe.load_lora_weights(...)` and the repository id above.""")
    return _card_sections(name, intro, grid, py_code, export, adapter_rows, training)


def _lora_card_body(name, where, base_model, instance_prompt, grid, info: dict, training, family) -> str:
    """The card of the `--adapter lora` baseline: a plain diffusers LoRA, loaded by stock diffusers."""
    base, pipeline_class, dtype, py_base, py_where, py_prompt = _usage_values(where, base_model, instance_prompt, family)
    rows = {f"{c} (r / alpha)": f"{v['rank']} / {v['alpha']}" for c, v in info["components"].items()}
    rows.update({"targets": json.dumps({c: v["targets"] for c, v in info["components"].items()}),
                 "parameters": f"{info['params']:,}",
                 "file": f"{DIFFUSERS_WEIGHT_NAME} ({format_size(info['file_size'])}, {info['dtype']})"})
    py_code = f"""import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained({py_base}, torch_dtype=torch.{dtype}).to("cuda")
pipe.load_lora_weights({py_where})
image = pipe({py_prompt}).images[0]"""
    sh_code = f"gralora-diffusion export-lora {shlex.quote(where)} lora_kohya.safetensors --format kohya   # ComfyUI / A1111 keys"
    intro = (f"A LoRA adapter for {md(base)} (the LoRA baseline of gralora-diffusion's trainer, "
             f"`--adapter lora`).{_trigger(instance_prompt)}")
    return _card_sections(name, intro, grid, py_code, ("Kohya keys (ComfyUI, A1111)", "", sh_code, ""), rows, training)


def _usage_values(where, base_model, instance_prompt, family) -> tuple:
    """What a card's usage code names: the base, the family's pipeline class and dtype, and the base, adapter
    and prompt as Python string literals (json.dumps: any text makes valid code)."""
    base = base_model or "stabilityai/stable-diffusion-xl-base-1.0"
    dtype = "float16" if family.denoiser == "unet" else "bfloat16"  # the DiTs are published and run in bf16
    return (base, family.pipeline_class_name, dtype, json.dumps(base), json.dumps(where),
            json.dumps(instance_prompt or "a photo"))


def _trigger(instance_prompt) -> str:
    # Any prompt, id or path is shown as literal text (md): no link, image or HTML can come from it.
    return f" Trigger prompt: {md(instance_prompt)}." if instance_prompt else ""


def _card_sections(name, intro: str, grid, py_code: str, export: tuple, rows: dict, training) -> str:
    """Every card's skeleton: title and intro, the sample grid, use with diffusers, an export section
    (title, text before, shell code, text after), the adapter table and the training settings."""
    title, before, sh_code, after = export
    py_fence, sh_fence = _fence(py_code), _fence(sh_code)
    parts = [f"\n# {md(name)}\n\n{intro}\n"]
    if grid:  # a path the card generator chose (samples/...), percent-encoded: never markup
        parts.append(f"\n![samples]({urllib.parse.quote(Path(grid).as_posix())})\n")
    parts.append(f"""
## Use with diffusers

{py_fence}python
{py_code}
{py_fence}

## {title}

{before + chr(10) + chr(10) if before else ""}{sh_fence}bash
{sh_code}
{sh_fence}
{chr(10) + after + chr(10) if after else ""}
## Adapter

{_table(rows)}
""")
    if training:
        parts.append(f"\n## Training settings\n\n{_table(training)}\n")
    return "".join(parts)


def _explain(err: Exception, repo_id: str) -> HubError | None:
    """huggingface_hub's error plus a sentence on what to do; None for errors that are not about the Hub."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        hint = "Offline mode is on (HF_HUB_OFFLINE=1): unset it on a machine with network access and run the push again."
    elif isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) in (401, 403):
        hint = (f"The Hub refused the token for {repo_id!r}: log in with `hf auth login` (a token with write access), "
                "set HF_TOKEN, or pass --token; check that you may write to that namespace.")
    elif isinstance(err, HfHubHTTPError):
        hint = f"The Hub answered with an error for {repo_id!r}; check the repo id and try again."
    elif isinstance(err, OSError) or type(err).__module__.split(".")[0].startswith("httpx"):
        hint = "The Hub could not be reached (no network?). Run the push again when online."
    else:
        return None
    return HubError(f"{hint} Nothing was deleted locally. ({type(err).__name__}: {err})")


def _check_essentials(folder: Path) -> None:
    """The adapter and the card must themselves pass the push rule; a link there stops the push."""
    for name in (WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME, CARD_NAME):
        why = _inside_regular_file(folder, name)
        if why is not None and why != "missing":  # a missing adapter: read_adapter_file says what to do
            raise HubError(f"{folder / name}: not uploaded ({why}); a push sends only regular files inside the "
                           "folder. Replace it with the file itself. Nothing was sent.")


def _say_refused(say, refused) -> None:
    if refused:
        say(f"Not uploaded ({len(refused)}: links and files outside the folder are never sent):")
        for name, why in refused:
            say(f"  {name}: {why}")


def push_to_hub(
    folder,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload GraLoRA adapter",
    include_lora_export: bool = False,
    dry_run: bool = False,
    say=None,
):
    """Create `repo_id` (if needed) and upload exactly `files_to_push(folder)`: the adapter, README.md
    and `samples/*`, each a regular file inside the folder (plus `pytorch_lora_weights.safetensors`, the exact LoRA
    export, with include_lora_export). Writes a model card first when the folder has none. `say`
    (e.g. print) gets the list before anything is sent. Returns huggingface_hub's CommitInfo, or the
    list of files with dry_run (nothing is contacted or written then)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"repo id {repo_id!r} is not valid: {err} Use `name` or `your-name/name`.") from None

    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise AdapterFileError(f"{folder}: {what}; give the folder holding {WEIGHT_NAME} (a training --output_dir).")
    _check_essentials(folder)
    source, kind = adapter_in(folder)  # refuse a folder without a valid adapter before any network call
    include_lora_export = include_lora_export and kind == "gralora"  # a LoRA baseline is its own LoRA file
    if dry_run:
        files, refused = push_plan(folder, include_lora_export)
        if say:
            say(f"Would upload {len(files)} files from {folder} to {repo_id} (dry run, nothing sent):")
            for name in files:
                say(f"  {name}")
            _say_refused(say, refused)
        return files
    if not (folder / CARD_NAME).exists():
        save_model_card(folder, repo_id=repo_id)
    if include_lora_export:
        export_lora(source, folder / DIFFUSERS_WEIGHT_NAME)
    _check_essentials(folder)
    files, refused = push_plan(folder, include_lora_export)
    if say:
        say(f"Uploading {len(files)} files from {folder} to {repo_id}:")
        for name in files:
            say(f"  {name}")
        _say_refused(say, refused)
    api = HfApi(token=token)  # made here, so it takes HF_ENDPOINT / HF_TOKEN as they are now
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        # An explicit list, not folder patterns: a pattern like *.png matches private photos at any depth.
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
        return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
    except Exception as err:  # noqa: BLE001 - classified below, re-raised untouched when not about the Hub
        explained = _explain(err, repo_id)
        if explained is None:
            raise
        raise explained from err
