"""Where an adapter comes from: an adapter file, a folder, a PEFT `save_pretrained` folder, a Hub
repo id, a state dict or an `AdapterFile`. `resolve_adapter` turns any of them into a checked
`AdapterFile` and touches no model; `check_model_path` and `looks_like_path` tell local paths from
Hub ids the same way for adapters and base models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .adapter_config import config_to_header
from .adapter_file import AdapterFile, find_peft_folders, from_flat_state_dict, read_adapter_file, read_peft_folder, to_flat_state_dict
from .constants import COMPONENTS, PICKLE_SUFFIXES, WEIGHT_NAME
from .errors import AdapterFileError, GraloraConfigError, TrainConfigError

HUB_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download")
DICT_KWARGS = ("gralora_configs", "metadata")


def resolve_adapter(source, weight_name: str | None = None, **kwargs) -> AdapterFile:
    """Read and check an adapter from any input `load_gralora_weights` takes. Touches no model."""
    unknown = sorted(set(kwargs) - set(HUB_KWARGS) - set(DICT_KWARGS))
    if unknown:
        raise TypeError(f"load_gralora_weights() got unexpected keyword arguments {unknown}; "
                        f"it takes {list(HUB_KWARGS + DICT_KWARGS)}.")
    if isinstance(source, AdapterFile):  # re-checked: an AdapterFile can be built by hand
        adapter = from_flat_state_dict(to_flat_state_dict(source.state_dicts), source.configs, source.metadata, source.source)
        adapter.files = source.files
        return adapter
    if isinstance(source, dict):
        return adapter_from_state_dict(source, kwargs.get("gralora_configs"), kwargs.get("metadata"))
    if not isinstance(source, (str, os.PathLike)):
        raise AdapterFileError(f"Cannot load an adapter from a {type(source).__name__}: pass a file, a folder, "
                               "a Hub repo id, a state dict with gralora_configs=..., or an AdapterFile.")
    subfolder = kwargs.get("subfolder")
    path = Path(source).expanduser()
    if path.exists():
        path = path / subfolder if subfolder else path
        if path.is_file():
            if weight_name is not None:
                raise GraloraConfigError(f"{path} is a file; weight_name={weight_name!r} only picks a file in a folder or repo.")
            return read_adapter_file(path)
        if path.is_dir():
            return _read_folder(path, weight_name)
        raise AdapterFileError(f"{path}: no such file or folder.")
    if looks_like_path(str(source)):
        raise AdapterFileError(f"{source}: no such file or folder (and not a Hub repo id).")
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    return _read_from_hub(str(source), weight_name, **hub)


def adapter_from_state_dict(state_dict: dict, gralora_configs=None, metadata: dict | None = None) -> AdapterFile:
    """The dict input form: tensors keyed `unet.<module>.gralora_A` (flat, as in the file; PEFT's
    `base_model.model.` prefix allowed) or {component: PEFT state dict} (nested, as the trainer's
    `collect_adapter` returns), plus `gralora_configs` = {component: GraloraConfig or config dict}
    (or the header's JSON string). Configs are required: shapes alone cannot tell r from k."""
    source = "<state dict>"
    if gralora_configs is None:
        raise AdapterFileError(
            f"{source}: a state dict needs its configs: pass gralora_configs={{component: GraloraConfig or dict}} "
            "(r, alpha, gralora_k, hybrid_r, target_modules), pass the adapter file itself (its header keeps "
            "them), or an AdapterFile from gd.read_adapter_file."
        )
    if isinstance(gralora_configs, str):
        try:
            gralora_configs = json.loads(gralora_configs)
        except (json.JSONDecodeError, RecursionError) as err:
            raise AdapterFileError(f"{source}: gralora_configs is a string but not JSON ({err}).") from None
    if not isinstance(gralora_configs, dict):
        raise AdapterFileError(f"{source}: gralora_configs must be {{component: config}}, got {type(gralora_configs).__name__}.")
    configs = {c: (dict(cfg) if isinstance(cfg, dict) else config_to_header(cfg)) for c, cfg in gralora_configs.items()}
    for cfg in configs.values():
        if isinstance(cfg.get("target_modules"), (set, tuple)):
            cfg["target_modules"] = sorted(cfg["target_modules"])
    if state_dict and all(isinstance(v, dict) for v in state_dict.values()):
        state_dict = {f"{c}.{key}": t for c, sd in state_dict.items() for key, t in sd.items()}
    return from_flat_state_dict(state_dict, configs, metadata, source)


def looks_like_path(text: str) -> bool:
    """True where `text` cannot be a Hub repo id (huggingface_hub's `validate_repo_id` refuses it:
    absolute, ./ or ~ paths, more than one slash, backslashes) or names a file by its suffix."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.lower().endswith((".safetensors", ".json") + PICKLE_SUFFIXES):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def check_model_path(flag: str, value: str, marker: str, error: type[Exception] = TrainConfigError) -> None:
    """A model given as a local folder must exist before diffusers is asked (it would try the Hub)."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise error(f"{flag} {value}: is a file; give a model folder written by save_pretrained, or a Hub id.")
        if not (path / marker).is_file():
            raise error(f"{flag} {value}: no {marker} in this folder; give a folder written by save_pretrained, or a Hub id.")
    elif looks_like_path(value):
        raise error(
            f"{flag} {value}: no such folder. Give a local model folder (e.g. from `gralora-diffusion make-tiny DIR`) "
            "or a Hub id such as stabilityai/stable-diffusion-xl-base-1.0."
        )


def _read_folder(folder: Path, weight_name: str | None) -> AdapterFile:
    """Our file (weight_name, else pytorch_gralora_weights.safetensors), else a PEFT save_pretrained
    layout, else the folder's only .safetensors file."""
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            present = sorted(p.name for p in folder.glob("*.safetensors"))
            raise AdapterFileError(f"{path}: no such file; .safetensors files in {folder}: {present or 'none'}.")
        return read_adapter_file(path)
    if (folder / WEIGHT_NAME).is_file():
        return read_adapter_file(folder / WEIGHT_NAME)
    if find_peft_folders(folder):
        return read_peft_folder(folder)
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return read_adapter_file(candidates[0])
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    note = f" Pickle files ({', '.join(pickles)}) are refused: we never unpickle adapters." if pickles else ""
    raise AdapterFileError(
        f"{folder}: no {WEIGHT_NAME}, no PEFT adapter_config.json, and {len(candidates)} other .safetensors "
        f"files ({', '.join(p.name for p in candidates) or 'none'}); pass weight_name=... to pick one.{note}"
    )


def _read_from_hub(repo_id: str, weight_name: str | None, **hub) -> AdapterFile:
    """Our file from a Hub repo (or the local HF cache), via hf_hub_download; without weight_name,
    a repo holding a PEFT save_pretrained layout instead is fetched with snapshot_download."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError

    if weight_name is not None and Path(weight_name).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{repo_id}/{weight_name}: pickle files are refused, we never unpickle adapters.")
    subfolder = hub.pop("subfolder", None)
    filename = weight_name or WEIGHT_NAME
    try:
        return read_adapter_file(hf_hub_download(repo_id, filename, subfolder=subfolder, **hub))
    except EntryNotFoundError as err:
        if weight_name is not None:
            raise _hub_error(repo_id, filename, subfolder, err, hub) from err
        first = err
    except (HFValidationError, HfHubHTTPError, OSError, ValueError) as err:
        if isinstance(err, AdapterFileError):
            raise
        raise _hub_error(repo_id, filename, subfolder, err, hub) from err
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{prefix}{d}{name}" for d in ["", *(f"{c}/" for c in COMPONENTS)]
                for name in ("adapter_config.json", "adapter_model.safetensors")]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **hub)) / prefix
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        folder = None
    if folder is not None and find_peft_folders(folder):
        return read_peft_folder(folder)
    raise _hub_error(repo_id, filename, subfolder, first, hub) from first


def _hub_error(repo_id: str, filename: str, subfolder, err: Exception, hub: dict) -> AdapterFileError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"{repo_id}/{subfolder.strip('/') + '/' if subfolder else ''}{filename}"
    if hub.get("revision"):
        where += f" (revision {hub['revision']})"
    offline = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "local_files_only=True" if hub.get("local_files_only") else None
    if isinstance(err, LocalEntryNotFoundError) or (offline and not isinstance(err, HFValidationError)):
        cache = hub.get("cache_dir") or constants.HF_HUB_CACHE
        todo = (f"{where} is not in the local Hugging Face cache ({cache}) and downloads are off ({offline or 'no network'}). "
                f"Download it once with network access (`hf download {repo_id}`), point cache_dir= at a cache that has "
                "it, or pass a local file or folder path.")
    elif isinstance(err, HFValidationError):
        todo = f"{repo_id!r} is neither an existing file or folder nor a valid Hub repo id (org/name)."
    elif isinstance(err, GatedRepoError):
        todo = f"{repo_id} is gated: accept its terms on the Hub and pass token=... (or log in with `hf auth login`)."
    elif isinstance(err, RepositoryNotFoundError):
        todo = f"Hub repo {repo_id} not found: check the id; for a private repo pass token=... ."
    elif isinstance(err, RevisionNotFoundError):
        todo = f"{repo_id} has no revision {hub.get('revision')!r}."
    elif isinstance(err, EntryNotFoundError):
        todo = (f"{where} does not exist, and the repo holds no PEFT save_pretrained adapter either; "
                "pass weight_name= (and subfolder=) to pick the adapter file.")
    else:
        todo = f"downloading {where} failed; check the network and the repo id, or pass a local path."
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return AdapterFileError(f"{todo} [huggingface_hub: {type(err).__name__}: {first_line}]")


def check_adapter_paths(paths) -> None:
    """Local adapters that do not exist fail before the (slow) base model loads."""
    for path in paths:
        if isinstance(path, (str, os.PathLike)) and not Path(path).expanduser().exists() and looks_like_path(str(path)):
            raise AdapterFileError(f"{path}: no such adapter file or folder (and not a Hub repo id).")
