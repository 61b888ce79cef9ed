"""Load, save and steer GraLoRA adapters on a diffusers pipeline: `GraloraLoaderMixin`.

diffusers' `load_lora_weights` builds a `LoraConfig` and cannot read GraLoRA keys, so loading is
ours. Once loaded, an adapter lives in PEFT's layers (our `GraloraLinear`), so diffusers' own
calls (`cross_attention_kwargs={"scale": s}`, `set_adapters`, `fuse_lora`) keep working on it.

Loading is atomic: the file, its header and every tensor are checked against the pipeline's
modules and widths first; then PEFT injects the layers with `low_cpu_mem_usage=True` (their
weights stay on the meta device) and `set_peft_model_state_dict` assigns the file's tensors. If
that still fails, the half-injected adapter is removed and the pipeline is as it was.

The `*_gralora*` methods touch GraLoRA layers only: a LoRA loaded beside with `load_lora_weights`
keeps its layers, its active adapters and its weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import StableDiffusionXLPipeline
from peft import GraloraConfig, set_peft_model_state_dict
from peft.tuners.gralora.layer import GraloraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from .adapter_file import (
    AdapterFile,
    collect_adapter,
    config_to_dict,
    find_peft_folders,
    from_flat_state_dict,
    read_adapter_file,
    read_peft_folder,
    save_adapter_file,
    split_module_key,
    to_flat_state_dict,
)
from .constants import COMPONENTS, PICKLE_SUFFIXES, WEIGHT_NAME, torch_dtype
from .errors import AdapterFileError, GraloraConfigError
from .inject import _matched_modules, _plain_modules, check_adapter_name, existing_adapter_names, inject_config

HUB_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download")
DICT_KWARGS = ("gralora_configs", "metadata")


# ---------------------------------------------------------------------------------------------
# Where an adapter comes from: AdapterFile, state dict, file, folder, Hub repo id
# ---------------------------------------------------------------------------------------------


def resolve_adapter(source, weight_name: str | None = None, **kwargs) -> AdapterFile:
    """Read and check an adapter from any input `load_gralora_weights` takes. Touches no model."""
    unknown = sorted(set(kwargs) - set(HUB_KWARGS) - set(DICT_KWARGS))
    if unknown:
        raise TypeError(f"load_gralora_weights() got unexpected keyword arguments {unknown}; "
                        f"it takes {list(HUB_KWARGS + DICT_KWARGS)}.")
    if isinstance(source, AdapterFile):  # re-checked: an AdapterFile can be built by hand
        return from_flat_state_dict(to_flat_state_dict(source.state_dicts), source.configs, source.metadata, source.source)
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
    if _looks_like_path(str(source)):
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
        except json.JSONDecodeError as err:
            raise AdapterFileError(f"{source}: gralora_configs is a string but not JSON ({err}).") from None
    if not isinstance(gralora_configs, dict):
        raise AdapterFileError(f"{source}: gralora_configs must be {{component: config}}, got {type(gralora_configs).__name__}.")
    configs = {c: (dict(cfg) if isinstance(cfg, dict) else config_to_dict(cfg)) for c, cfg in gralora_configs.items()}
    for cfg in configs.values():
        if isinstance(cfg.get("target_modules"), (set, tuple)):
            cfg["target_modules"] = sorted(cfg["target_modules"])
    if state_dict and all(isinstance(v, dict) for v in state_dict.values()):
        state_dict = {f"{c}.{key}": t for c, sd in state_dict.items() for key, t in sd.items()}
    return from_flat_state_dict(state_dict, configs, metadata, source)


def _looks_like_path(text: str) -> bool:
    """Repo ids are `name` or `org/name`; anything else that does not exist is a missing path."""
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
            or text.lower().endswith((".safetensors", ".json") + PICKLE_SUFFIXES))


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


# ---------------------------------------------------------------------------------------------
# Checking an adapter against a pipeline, injecting it, undoing it
# ---------------------------------------------------------------------------------------------


def _gralora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, GraloraLayer)]


def _gralora_names(model: nn.Module) -> list[str]:
    configs = getattr(model, "peft_config", None) or {}
    return [name for name, cfg in configs.items() if str(getattr(cfg, "peft_type", "")).endswith("GRALORA")]


@dataclass
class _Step:
    component: str
    model: nn.Module
    config: GraloraConfig
    state_dict: dict[str, torch.Tensor]


def check_fits(model: nn.Module, component: str, config: GraloraConfig, state_dict: dict, source: str) -> None:
    """Every module with weights exists here, is a Linear of the widths the tensors imply, and the
    config's target_modules select exactly those modules (so injection creates no weightless layer)."""
    modules = dict(_plain_modules(model))
    weighted: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, suffix = split_module_key(key)
        weighted.setdefault(module, {})[suffix] = tensor
    k = config.gralora_k
    for name, tensors in weighted.items():
        module = modules.get(name)
        if module is None:
            raise AdapterFileError(
                f"{source}: {component}.{name} has GraLoRA weights, but this pipeline's {component} "
                f"({type(model).__name__}) has no module {name!r}: the adapter was trained on another base model."
            )
        if not isinstance(module, nn.Linear):
            raise AdapterFileError(f"{source}: {component}.{name} is a {type(module).__name__} here; GraLoRA adapts nn.Linear only.")
        A, B = tensors["gralora_A"], tensors["gralora_B"]
        fits = (A.shape[1] * k, B.shape[2] * k)
        if fits != (module.in_features, module.out_features):
            raise AdapterFileError(
                f"{source}: {component}.{name}: adapter trained on another base model: here it is Linear "
                f"{module.in_features}->{module.out_features}, but gralora_A {tuple(A.shape)} / gralora_B "
                f"{tuple(B.shape)} (k={k}) fit Linear {fits[0]}->{fits[1]}."
            )
    matched = set(_matched_modules(model, config, component))
    extra, unmatched = sorted(matched - set(weighted)), sorted(set(weighted) - matched)
    if extra or unmatched:
        raise AdapterFileError(
            f"{source}: {component}: target_modules {config.target_modules!r} select {len(matched)} modules here and the "
            f"file has weights for {len(weighted)}; {len(extra)} targeted modules have no weights (e.g. {extra[:2]}), "
            f"{len(unmatched)} weighted modules are not targeted (e.g. {unmatched[:2]}). The adapter was trained on "
            "another base model, or the file is inconsistent."
        )


class _ModelState:
    """What injecting an adapter changes on a model besides the new layers, to put back on failure."""

    _MISSING = object()

    def __init__(self, model: nn.Module):
        self.model = model
        self.had_config = "peft_config" in vars(model)
        self.flag = vars(model).get("_hf_peft_config_loaded", self._MISSING)
        self.requires_grad = {p: p.requires_grad for p in model.parameters()}
        self.active = {m: list(m.active_adapters) for m in model.modules() if isinstance(m, BaseTunerLayer)}

    def restore(self) -> None:
        model = self.model
        for module, active in self.active.items():
            module.set_adapter(active)
        for p, flag in self.requires_grad.items():
            p.requires_grad_(flag)
        if not self.had_config and "peft_config" in vars(model):
            del model.peft_config
        if self.flag is self._MISSING:
            vars(model).pop("_hf_peft_config_loaded", None)
        else:
            model._hf_peft_config_loaded = self.flag


def _inject(model: nn.Module, config: GraloraConfig, adapter_name: str) -> None:
    # low_cpu_mem_usage: adapter weights are not copied in but assigned from the file. PEFT's GraLoRA
    # layer still kaiming-initialises A and B (it builds them with torch.empty before registering
    # them); injecting under torch.device("meta") would skip that, but its dispatch overhead made
    # loading 1.7x slower on the tiny pipeline and no faster at SDXL widths on CPU, so we do not.
    inject_config(model, config, adapter_name, low_cpu_mem_usage=True)


def remove_gralora_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete one GraLoRA adapter from a model; GraLoRA layers left without adapters give their
    place back to their base layer (the original module object, or a LoRA layer wrapping it)."""
    for layer in _gralora_layers(model):
        layer.delete_adapter(adapter_name)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
        if not configs:
            del model.peft_config
            if hasattr(model, "_hf_peft_config_loaded"):
                model._hf_peft_config_loaded = False
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, GraloraLayer) and not child.gralora_A]
    for parent, name, child in swaps:
        setattr(parent, name, child.base_layer)


def _load_steps(steps: list[_Step], adapter_name: str, source: str) -> None:
    states = [_ModelState(step.model) for step in steps]
    done = []
    try:
        for step in steps:
            done.append(step)
            _inject(step.model, step.config, adapter_name)
            result = set_peft_model_state_dict(step.model, step.state_dict, adapter_name=adapter_name, low_cpu_mem_usage=True)
            empty = [n for n, p in step.model.named_parameters() if p.is_meta]
            if result.unexpected_keys or empty:
                raise AdapterFileError(
                    f"{source}: {step.component}: PEFT did not place every tensor (unexpected keys "
                    f"{result.unexpected_keys[:3]}, weights left empty {empty[:3]})."
                )
    except BaseException as err:
        for step, state in zip(done, states):
            remove_gralora_adapter(step.model, adapter_name)
            state.restore()
        if isinstance(err, Exception) and not isinstance(err, (AdapterFileError, GraloraConfigError)):
            raise AdapterFileError(
                f"{source}: loading into {done[-1].component} failed ({type(err).__name__}: {err}); "
                "the adapter was removed again and the pipeline is unchanged."
            ) from err
        raise


@contextlib.contextmanager
def _offloading_paused(pipe):
    """Accelerate's CPU-offload hooks off while layers are injected, then on again, as diffusers'
    `load_lora_weights` does (its own helper); here also when loading fails."""
    from diffusers import DiffusionPipeline
    from diffusers.loaders.lora_base import _func_optionally_disable_offloading

    if not isinstance(pipe, DiffusionPipeline):
        yield
        return
    model_offload, sequential_offload, group_offload = _func_optionally_disable_offloading(pipe)
    try:
        yield
    finally:
        device = getattr(pipe, "_offload_device", None)  # the device offloading was enabled for
        if model_offload:
            pipe.enable_model_cpu_offload(device=device)
        elif sequential_offload:
            pipe.enable_sequential_cpu_offload(device=device)
        elif group_offload:
            from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

            for component in pipe.components.values():
                if isinstance(component, nn.Module):
                    _maybe_remove_and_reapply_group_offloading(component)


# ---------------------------------------------------------------------------------------------
# The mixin
# ---------------------------------------------------------------------------------------------


class GraloraLoaderMixin:
    """GraLoRA adapter methods for any diffusers pipeline with `unet` / `text_encoder` /
    `text_encoder_2`. Mix into a pipeline class, or add to an object with `patch_pipeline`."""

    def _gralora_components(self, components=None) -> dict[str, nn.Module]:
        present = {c: m for c in COMPONENTS if isinstance(m := getattr(self, c, None), nn.Module)}
        if components is None:
            return present
        components = [components] if isinstance(components, str) else list(components)
        unknown = [c for c in components if c not in present]
        if unknown:
            raise GraloraConfigError(f"components {unknown} are not in this pipeline; it has {list(present)}.")
        return {c: present[c] for c in components}

    def _all_gralora_layers(self, components=None):
        return [layer for model in self._gralora_components(components).values() for layer in _gralora_layers(model)]

    # -- save / load ---------------------------------------------------------------------------

    def save_gralora_weights(self, save_directory, adapter_name: str = "default", weight_name: str = WEIGHT_NAME,
                             dtype=None, base_model: str | None = None, metadata: dict[str, str] | None = None) -> Path:
        """Write one adapter (every component that has it) as a single safetensors file; returns its path.
        `dtype`: torch.float16 / torch.bfloat16 (or "fp16", "bf16") to save smaller; default as trained."""
        if not str(weight_name).endswith(".safetensors"):
            raise GraloraConfigError(f"weight_name={weight_name!r}: adapters are saved as .safetensors only.")
        if dtype is not None:
            dtype = torch_dtype(dtype)
        available = self.list_gralora_adapters()
        if not any(adapter_name in names for names in available.values()):
            raise GraloraConfigError(f"No GraLoRA adapter named {adapter_name!r}; this pipeline has {available}.")
        state_dicts, configs = collect_adapter(self._gralora_components(), adapter_name)
        base_model = base_model or getattr(self, "name_or_path", None)
        path = Path(save_directory) / weight_name
        return save_adapter_file(path, state_dicts, configs, base_model=base_model, metadata=metadata, dtype=dtype)

    def load_gralora_weights(self, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
                             adapter_name: str | None = None, **kwargs) -> str:
        """Load a GraLoRA adapter; returns its name (auto: default_0, default_1, ... as diffusers names them).

        Input: an adapter file; a folder (its pytorch_gralora_weights.safetensors, `weight_name`, a PEFT
        `save_pretrained` layout, or its only .safetensors file); a Hub repo id (hf_hub_download with
        `revision`, `subfolder`, `cache_dir`, `token`, `local_files_only`, `force_download`); an
        `AdapterFile`; or a state dict with `gralora_configs={component: config}` (see
        `adapter_from_state_dict`). Everything is checked before any module changes; a failure leaves
        the pipeline as it was. Pickle files are refused.
        """
        adapter = resolve_adapter(pretrained_model_name_or_path_or_dict, weight_name, **kwargs)
        source = adapter.source
        if adapter_name is None:
            adapter_name = self._next_adapter_name()
        else:
            check_adapter_name(adapter_name)
        taken = {c: sorted(existing_adapter_names(m)) for c, m in self._gralora_components().items()}
        if any(adapter_name in names for names in taken.values()):
            raise GraloraConfigError(
                f"An adapter named {adapter_name!r} already exists ({taken}). Pick another adapter_name, or "
                f"delete it first (delete_gralora_adapters / delete_adapters); nothing was loaded."
            )
        if any(layer.merged for layer in self._all_gralora_layers()):
            raise GraloraConfigError("GraLoRA adapters are fused into the weights; call unfuse_gralora() before loading another.")
        present = self._gralora_components()
        absent = [c for c in adapter.configs if c not in present]
        if absent:
            raise AdapterFileError(f"{source}: the adapter has weights for {absent}, but this {type(self).__name__} "
                                   f"has no such component (it has {list(present)}).")
        steps = []
        for component, cfg in adapter.configs.items():
            config = GraloraConfig(r=cfg["r"], alpha=cfg["alpha"], gralora_k=cfg["gralora_k"], hybrid_r=cfg["hybrid_r"],
                                   gralora_dropout=cfg["gralora_dropout"], target_modules=cfg["target_modules"],
                                   base_model_name_or_path=adapter.base_model)
            model = present[component]
            check_fits(model, component, config, adapter.state_dicts[component], source)
            steps.append(_Step(component, model, config, adapter.state_dicts[component]))
        with _offloading_paused(self):
            _load_steps(steps, adapter_name, source)
        return adapter_name

    def _next_adapter_name(self) -> str:
        taken = set().union(*(existing_adapter_names(m) for m in self._gralora_components().values()))
        n = len(taken)
        while f"default_{n}" in taken:
            n += 1
        return f"default_{n}"

    # -- which adapters, at which weights ------------------------------------------------------

    def list_gralora_adapters(self) -> dict[str, list[str]]:
        """{component: [GraLoRA adapter names]} (LoRA adapters left out; diffusers' get_list_adapters lists all)."""
        return {c: names for c, m in self._gralora_components().items() if (names := _gralora_names(m))}

    def get_active_gralora_adapters(self) -> list[str]:
        active: list[str] = []
        for layer in self._all_gralora_layers():
            active += [a for a in layer.active_adapters if a in layer.gralora_A and a not in active]
        return active

    def _check_gralora_names(self, names) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        available = {n for ns in self.list_gralora_adapters().values() for n in ns}
        missing = [n for n in names if n not in available]
        if missing:
            others = {n for m in self._gralora_components().values() for n in existing_adapter_names(m)} - available
            hint = f" ({sorted(set(missing) & others)} are LoRA adapters: use diffusers' own methods)" if set(missing) & others else ""
            raise GraloraConfigError(f"No GraLoRA adapter(s) {missing}; loaded: {sorted(available)}{hint}.")
        return names

    def set_gralora_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate these GraLoRA adapters at these weights, as diffusers' `set_adapters` does (a float,
        a list, or per adapter a dict {component: weight}, the UNet's weight possibly a block dict like
        {"down": ..., "mid": ..., "up": ...}); GraLoRA adapters not named become inactive, LoRA layers
        are left alone."""
        from diffusers.loaders.peft import _SET_ADAPTER_SCALE_FN_MAPPING
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        names = self._check_gralora_names(adapter_names)
        if any(layer.merged for layer in self._all_gralora_layers()):
            raise GraloraConfigError("GraLoRA adapters are fused; call unfuse_gralora() before changing adapters or weights.")
        weights = copy.deepcopy(adapter_weights)
        weights = weights if isinstance(weights, list) else [weights] * len(names)
        if len(weights) != len(names):
            raise GraloraConfigError(f"{len(names)} adapter names but {len(weights)} weights.")
        for component, model in self._gralora_components().items():
            if not _gralora_layers(model):
                continue
            per_adapter = [w.get(component) if isinstance(w, dict) else w for w in weights]
            per_adapter = [1.0 if w is None else w for w in per_adapter]
            per_adapter = _SET_ADAPTER_SCALE_FN_MAPPING[type(model).__name__](model, per_adapter)
            set_weights_and_activate_adapters(_OnlyGraloraLayers(model), names, per_adapter)

    def delete_gralora_adapters(self, adapter_names) -> None:
        """Remove GraLoRA adapters (layers left empty give their place back to the base module)."""
        names = self._check_gralora_names(adapter_names)
        fused = sorted({a for layer in self._all_gralora_layers() for a in layer.merged_adapters} & set(names))
        if fused:
            raise GraloraConfigError(f"GraLoRA adapter(s) {fused} are fused; call unfuse_gralora() before deleting them.")
        for model in self._gralora_components().values():
            for name in names:
                if name in _gralora_names(model):
                    remove_gralora_adapter(model, name)

    def unload_gralora_weights(self) -> None:
        """Unfuse and remove every GraLoRA adapter: the GraLoRA-adapted modules are the original module
        objects again, with their original weights. A LoRA loaded beside stays."""
        self.unfuse_gralora()
        for model in self._gralora_components().values():
            for name in _gralora_names(model):
                remove_gralora_adapter(model, name)

    # -- fuse ------------------------------------------------------------------------------------

    def fuse_gralora(self, gralora_scale: float = 1.0, components=None, adapter_names=None, safe_fusing: bool = False,
                     exact_unfuse: bool = True) -> None:
        """Merge GraLoRA adapters (default: the active ones) into the base weights at `gralora_scale`
        times their current weights, as diffusers' `fuse_lora(lora_scale=...)` does.

        Unlike diffusers, `unfuse_gralora` then puts the adapters' scales back as they were before the
        fuse, and with `exact_unfuse` (default) the base weights bit for bit: a CPU copy of each
        changed weight is kept while fused (set it False to save that memory; unfusing then subtracts,
        exact up to float rounding). `safe_fusing` checks every fused weight for NaN/Inf before any
        weight changes."""
        layers = [(c, layer) for c, model in self._gralora_components(components).items() for layer in _gralora_layers(model)]
        if adapter_names is not None:
            adapter_names = self._check_gralora_names(adapter_names)
        plan = []
        for component, layer in layers:
            todo = [a for a in (adapter_names or layer.active_adapters) if a in layer.gralora_A and a not in layer.merged_adapters]
            if todo:
                plan.append((component, layer, todo))
        if safe_fusing:
            names = {id(m): n for c, model in self._gralora_components(components).items() for n, m in model.named_modules()}
            for component, layer, todo in plan:
                weight = layer.get_base_layer().weight
                with torch.no_grad():
                    fused = weight.detach().clone()
                    for adapter in todo:
                        fused += layer.get_delta_weight(adapter) * gralora_scale
                if not torch.isfinite(fused).all():
                    raise AdapterFileError(
                        f"{component}.{names.get(id(layer), '?')}: fusing GraLoRA adapter(s) {todo} at scale {gralora_scale} "
                        "gives NaN/Inf weights; the adapter is broken. Nothing was fused."
                    )
        sharing = _tuners_by_weight(self._gralora_components(components).values())
        for _, layer, todo in plan:
            state = getattr(layer, "_gralora_fuse_state", None)
            if state is None or not layer.merged:  # first fuse on this layer: remember how to undo it
                weight = layer.get_base_layer().weight
                backup = weight.detach().to("cpu", copy=True) if exact_unfuse else None
                state = layer._gralora_fuse_state = {"scaling": dict(layer.scaling), "backup": backup,
                                                     "others": _others_merged(layer, sharing)}
            for adapter in todo:
                layer.scaling[adapter] *= gralora_scale
            layer.merge(adapter_names=todo)
            state["merged"] = list(layer.merged_adapters)
        if plan:
            self._merged_adapters = set(getattr(self, "_merged_adapters", set())) | {a for _, _, t in plan for a in t}

    def unfuse_gralora(self, components=None) -> None:
        """Undo `fuse_gralora`: base weights back (bit for bit with exact_unfuse) and adapter scales back."""
        models = self._gralora_components(components).values()
        sharing = _tuners_by_weight(models)
        for layer in (layer for model in models for layer in _gralora_layers(model)):
            _unfuse_layer(layer, sharing)
        merged = {a for m in self._gralora_components().values() for t in m.modules()
                  if isinstance(t, BaseTunerLayer) for a in t.merged_adapters}
        if hasattr(self, "_merged_adapters"):
            self._merged_adapters = set(self._merged_adapters) & merged

    # -- on / off --------------------------------------------------------------------------------

    def disable_gralora(self) -> None:
        """Run without GraLoRA adapters (fused ones are unfused first); LoRA adapters stay on."""
        self.unfuse_gralora()  # exactly; PEFT's forward would otherwise unmerge by subtraction
        for layer in self._all_gralora_layers():
            layer.enable_adapters(False)

    def enable_gralora(self) -> None:
        for layer in self._all_gralora_layers():
            layer.enable_adapters(True)


class _OnlyGraloraLayers:
    """What diffusers' `set_weights_and_activate_adapters` needs of a model, `named_modules()`, with
    the GraLoRA layers only: so its weight logic (per-block dicts included) is reused as is, and a LoRA
    loaded beside keeps its own active adapters and weights."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_modules(self):
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, GraloraLayer)]


def _tuners_by_weight(models) -> dict[int, list]:
    """Adapter layers grouped by the base Linear they wrap (a LoRA and a GraLoRA layer nested on one
    module share it, whichever wraps the other)."""
    groups: dict[int, list] = {}
    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                groups.setdefault(id(module.get_base_layer()), []).append(module)
    return groups


def _others_merged(layer, sharing) -> tuple:
    """What the other adapter layers on this layer's weight have merged into it."""
    return tuple((id(t), tuple(t.merged_adapters)) for t in sharing.get(id(layer.get_base_layer()), []) if t is not layer)


def _unfuse_layer(layer, sharing) -> None:
    """Unmerge one GraLoRA layer: from the CPU copy when nothing else merged into or unmerged from
    the weight since `fuse_gralora` (bit-exact), else by subtraction; then the pre-fuse scales return."""
    state = layer.__dict__.pop("_gralora_fuse_state", None)
    if layer.merged:
        backup = state and state["backup"]
        if (backup is not None and state["merged"] == layer.merged_adapters
                and state["others"] == _others_merged(layer, sharing)):
            with torch.no_grad():
                layer.get_base_layer().weight.copy_(backup)
            layer.merged_adapters.clear()
        else:
            layer.unmerge()
    if state is not None:
        for adapter, scaling in state["scaling"].items():
            if adapter in layer.scaling:
                layer.scaling[adapter] = scaling


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

_PATCHED_CLASSES: dict[type, type] = {}


def patch_pipeline(pipe):
    """Give an existing pipeline object the GraLoRA methods (its class becomes a cached subclass
    with `GraloraLoaderMixin`, keeping the original class name, so `save_pretrained` output still
    loads with stock diffusers). Returns the same object."""
    if isinstance(pipe, GraloraLoaderMixin):
        return pipe
    if not any(isinstance(getattr(pipe, c, None), nn.Module) for c in COMPONENTS):
        raise GraloraConfigError(f"{type(pipe).__name__} has no unet / text_encoder / text_encoder_2 to carry GraLoRA adapters.")
    cls = type(pipe)
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(cls.__name__, (cls, GraloraLoaderMixin), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    pipe.__class__ = _PATCHED_CLASSES[cls]
    return pipe


class GraloraStableDiffusionXLPipeline(StableDiffusionXLPipeline, GraloraLoaderMixin):
    """diffusers' StableDiffusionXLPipeline with the GraLoRA loader methods."""
