"""Base models by name, for every command: `tiny` (any family's random tiny pipeline), the families'
embedded models (`world`), a local folder written by save_pretrained, or a Hub id. `load_base` is the
one place they are resolved; `base_family` tells the family without loading anything."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GraloraConfigError
from . import DEFAULT_FAMILY, TINY, Family, families, family_of_class_name, family_of_pipeline, get_family

MODEL_INDEX = "model_index.json"


def _embedded_owner(spec: str) -> Family | None:
    return next((f for f in families() if spec in f.embedded), None)


def model_index_class(spec: str) -> str | None:
    """`_class_name` from a folder's model_index.json, or from the Hub cache's copy; None if neither is there."""
    path = Path(str(spec)).expanduser() / MODEL_INDEX
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long for the OS is no folder
        found = False
    if not found:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(spec), MODEL_INDEX)
        except Exception:  # not a repo id: nothing cached
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def base_family(spec, family=None, flag: str = "--base") -> Family | None:
    """The family of base `spec` without loading it: `--family` if given (checked against an embedded
    name), the embedded model's, the one model_index.json names, else None (a Hub id not cached yet)."""
    chosen = get_family(family) if family else None
    spec = str(spec)
    if spec == TINY:
        return chosen or get_family(DEFAULT_FAMILY)
    owner = _embedded_owner(spec)
    if owner is not None:
        if chosen is not None and chosen is not owner:
            raise GraloraConfigError(f"{flag} {spec} is a {owner.name} model; --family {chosen.name} does not fit it "
                                     f"(use `{flag} tiny --family {chosen.name}` for a tiny {chosen.name}).")
        return owner
    return chosen or family_of_class_name(model_index_class(spec))


def default_device_dtype(device=None, dtype=None):
    """(device, torch dtype): CUDA in fp16 when there is one, else CPU in fp32; names like 'bf16' accepted."""
    import torch

    from ..constants import torch_dtype

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise GraloraConfigError(f"--device {device!r}: not a device; use cpu or cuda (cuda:0, ...).") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise GraloraConfigError(f"--device {device}: torch {torch.__version__} sees no CUDA device here; use --device cpu.")
    if dtype is not None:
        dtype = torch_dtype(dtype)
    return device, dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)


def single_file(spec: str, flag: str = "--base", error=GraloraConfigError) -> bool:
    """Whether `spec` is one checkpoint file (as A1111 and ComfyUI keep models): a `.safetensors` file is;
    a pickled one (`.ckpt`, `.pt`, `.bin`, ...) is refused, never unpickled (loading a pickle can run code)."""
    from ..constants import PICKLE_SUFFIXES

    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise error(f"{flag} {spec}: a pickled checkpoint; gralora-diffusion never unpickles (loading a pickle can run "
                    "code). Use the model's .safetensors file, a diffusers folder or a Hub id, or convert it in a trusted environment.")
    return path.suffix.lower() == ".safetensors" and path.is_file()


def _from_single_file(fam: Family, spec: str, dtype, flag: str, error):
    """diffusers' `from_single_file` (its own key conversion; the model's configs come from the Hub cache)."""
    try:
        return fam.pipeline_class.from_single_file(spec, torch_dtype=dtype)
    except Exception as err:  # noqa: BLE001 - diffusers raises many kinds here; each becomes one line naming the file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise error(f"{flag} {spec}: diffusers' {fam.pipeline_class.__name__}.from_single_file cannot load this checkpoint "
                    f"({type(err).__name__}: {first}). It needs a whole {fam.name} checkpoint, and the model's configs in the "
                    "Hugging Face cache (one online run).") from None


def load_base(spec, family=None, device=None, dtype=None, say=print, flag: str = "--base", revision=None,
              variant=None, vae=None, error=GraloraConfigError, quantize_base: str = "none",
              trained_text_encoders: bool = False):
    """The base model `spec` loaded, placed and patched with the GraLoRA methods: (pipeline, Family).

    `spec`: `tiny` (the family's random tiny pipeline; `family` default sdxl), an embedded name (`world`),
    a folder written by save_pretrained, a Hub id (cached or downloadable), or one `.safetensors`
    checkpoint file (`from_single_file`, of `family`, default sdxl; pickled `.ckpt` files are refused). `family` overrides what
    model_index.json says. `revision`/`variant`/`vae` (a VAE's Hub id or folder) go to from_pretrained.
    `say` (None: silent) gets one line when loading starts; the libraries' bars and notes stay quiet.
    `quantize_base` (none, int8, nf4, fp8): the denoiser and, unless `trained_text_encoders`, the text
    encoders quantized by diffusers' configs (quantize.py): a folder or Hub id as it loads, an embedded
    model right after it is built, through the same configs.
    Every failure is one line of `error` naming `flag`."""
    from ..quantize import check_quantize_base, pipeline_quantization, quantize_loaded, quantized_components
    from ..quiet import load_pretrained, quiet_libraries
    from ..sources import check_model_path
    from ..threads import announce

    device, dtype = default_device_dtype(device, dtype)
    check_quantize_base(quantize_base, error=error, device=device)
    spec = str(spec)
    single = single_file(spec, flag, error)
    fam = get_family(family or DEFAULT_FAMILY) if single else base_family(spec, family, flag)
    quantization = pipeline_quantization(quantize_base, quantized_components(fam or get_family(DEFAULT_FAMILY),
                                                                             trained_text_encoders))
    embedded = spec == TINY or _embedded_owner(spec) is not None
    if not embedded and not single:
        check_model_path(flag, spec, MODEL_INDEX, error)
    announce(say)  # the CPU thread rule, for Python callers too
    if say:
        say(f"Loading base model {spec}{f' ({fam.name})' if fam and spec == TINY and fam.name != DEFAULT_FAMILY else ''}"
            f"{'' if quantize_base == 'none' else f' ({quantize_base})'} ...")
    with quiet_libraries():  # importing diffusers' pipelines makes transformers talk about torchvision
        from diffusers import DiffusionPipeline

        from ..loader import patch_pipeline

        if embedded:
            pipe = fam.build(spec)
        elif single:
            pipe = _from_single_file(fam, spec, dtype, flag, error)
        if (embedded or single) and quantization is not None:  # in the run's dtype: a quantized model cannot be cast after
            pipe.to(dtype=dtype)
            quantize_loaded(pipe, quantization)
    if not embedded and not single:
        kwargs = {"torch_dtype": dtype, "revision": revision, "variant": variant, "quantization_config": quantization}
        if vae:
            from diffusers import AutoencoderKL

            vae_class = (fam.component_class("vae") if fam else None) or AutoencoderKL
            kwargs["vae"] = load_pretrained(vae_class, vae, "--pretrained_vae_model_name_or_path", torch_dtype=dtype,
                                            revision=revision, folder_hint="a VAE folder written by save_pretrained")
        try:
            pipe = load_pretrained(fam.pipeline_class if fam else DiffusionPipeline, spec, flag,
                                   folder_hint="a folder written by save_pretrained (e.g. `gralora-diffusion make-tiny DIR`)",
                                   **{k: v for k, v in kwargs.items() if v is not None})
        except GraloraConfigError as err:
            raise error(str(err)) from None
        fam = fam or family_of_pipeline(pipe)
        if fam is None:
            raise error(f"{flag} {spec}: a {type(pipe).__name__}, which no family here handles; "
                        f"pass --family NAME to treat it as one of: {', '.join(f.name for f in families())}.")
    with quiet_libraries():  # a cast says which modules "should be kept in float32", even when none
        pipe.to(device)
        if pipe.dtype != dtype:  # only the embedded models get here (from_pretrained loaded the dtype)
            pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return patch_pipeline(pipe), fam


def base_config(spec, component: str):
    """`component`'s config (a dict or a diffusers FrozenDict) of base `spec` where this machine has it: an
    embedded model (built), a folder, or the Hub cache; None otherwise. Nothing downloads."""
    spec = str(spec)
    if spec == "gralora-diffusion/tiny-sdxl":  # the name tiny.py's pipeline goes by in adapter headers
        spec = TINY
    if spec == TINY or _embedded_owner(spec) is not None:
        model = getattr(base_family(spec).build(spec), component, None)
        return None if model is None else model.config
    path = Path(spec).expanduser() / component / "config.json"
    try:  # the header's base_model is any string: a name too long for the OS is no folder
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, f"{component}/config.json")
        except Exception:  # not a repo id: nothing cached to read
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise GraloraConfigError(f"{path}: the base model's {component} config is not readable JSON ({err}).") from None


def tiny_pipeline(family: str = DEFAULT_FAMILY, seed: int = 0):
    """A real pipeline of `family` with random weights, built offline, deterministic for `seed`."""
    return get_family(family).build(TINY, seed=seed)


def save_tiny(family: str, directory, seed: int = 0) -> Path:
    """Write `family`'s tiny pipeline with save_pretrained (a folder every --base / --pretrained_model_name_or_path takes)."""
    from ..outputs import claim_folder, mark_folder

    directory = claim_folder(directory, "make-tiny", "directory", write=False)  # the output rule: new, empty or ours
    tiny_pipeline(family, seed).save_pretrained(directory)
    mark_folder(directory, "make-tiny")
    return Path(directory)
