"""Load, save and steer GraLoRA adapters on a diffusers pipeline: `GraloraLoaderMixin`.

diffusers' `load_lora_weights` builds a `LoraConfig` and cannot read GraLoRA keys, so loading is
ours. Once loaded, an adapter lives in PEFT's layers (our `GraloraLinear`), so diffusers' own
calls (`cross_attention_kwargs={"scale": s}`, `set_adapters`, `fuse_lora`) keep working on it.

This is the pipeline layer, a loop over the components `unet`, `text_encoder`, `text_encoder_2`
(as diffusers' `loaders/lora_base.py`): where an adapter comes from is `sources.py`, what happens to
each model (fit checks, injection with rollback, removal, fuse state, weights) is `model_ops.py`.

Loading is atomic: the file, its header and every tensor are checked against the pipeline's
modules and widths first; then PEFT injects the layers and assigns the file's tensors. If that
still fails, the half-injected adapter is removed and the pipeline is as it was.

The `*_gralora*` methods touch GraLoRA layers only: a LoRA loaded beside with `load_lora_weights`
keeps its layers, its active adapters and its weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch.nn as nn
from diffusers import StableDiffusionXLPipeline
from peft.tuners.gralora.layer import GraloraLayer

from .adapter_config import config_from_header
from .adapter_file import collect_adapter, save_adapter_file
from .constants import COMPONENTS, WEIGHT_NAME, torch_dtype
from .errors import AdapterFileError, GraloraConfigError
from .inject import check_adapter_name, existing_adapter_names
from .model_ops import (
    check_fits,
    fuse_layer,
    fused_weight_is_finite,
    gralora_adapter_names,
    gralora_layers,
    load_into_models,
    merged_adapter_names,
    offloading_paused,
    remove_gralora_adapter,
    set_gralora_weights,
    tuners_by_weight,
    unfuse_layer,
)
from .numbers import limited
from .sources import resolve_adapter


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
        return [layer for model in self._gralora_components(components).values() for layer in gralora_layers(model)]

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
        for component, header in adapter.configs.items():
            config = config_from_header(header, source, component, base_model=adapter.base_model)
            check_fits(present[component], component, config, adapter.state_dicts[component], source)
            steps.append((component, present[component], config, adapter.state_dicts[component]))
        with offloading_paused(self):
            load_into_models(steps, adapter_name, source)
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
        return {c: names for c, m in self._gralora_components().items() if (names := gralora_adapter_names(m))}

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
        names = self._check_gralora_names(adapter_names)
        if any(layer.merged for layer in self._all_gralora_layers()):
            raise GraloraConfigError("GraLoRA adapters are fused; call unfuse_gralora() before changing adapters or weights.")
        weights = copy.deepcopy(adapter_weights)
        weights = weights if isinstance(weights, list) else [weights] * len(names)
        if len(weights) != len(names):
            raise GraloraConfigError(f"{len(names)} adapter names but {len(weights)} weights.")
        components = self._gralora_components()
        for name, weight in zip(names, weights):
            check_adapter_weight(weight, f"adapter_weights for {name!r}", list(components))
        for component, model in components.items():
            if gralora_layers(model):
                try:
                    set_gralora_weights(model, names, [w.get(component) if isinstance(w, dict) else w for w in weights])
                except (ValueError, TypeError, KeyError) as err:  # diffusers' block-dict checks
                    raise GraloraConfigError(f"adapter_weights for {component}: {err}") from None

    def delete_gralora_adapters(self, adapter_names) -> None:
        """Remove GraLoRA adapters (layers left empty give their place back to the base module)."""
        names = self._check_gralora_names(adapter_names)
        fused = sorted({a for layer in self._all_gralora_layers() for a in layer.merged_adapters} & set(names))
        if fused:
            raise GraloraConfigError(f"GraLoRA adapter(s) {fused} are fused; call unfuse_gralora() before deleting them.")
        for model in self._gralora_components().values():
            for name in names:
                if name in gralora_adapter_names(model):
                    remove_gralora_adapter(model, name)

    def unload_gralora_weights(self) -> None:
        """Unfuse and remove every GraLoRA adapter: the GraLoRA-adapted modules are the original module
        objects again, with their original weights. A LoRA loaded beside stays."""
        self.unfuse_gralora()
        for model in self._gralora_components().values():
            for name in gralora_adapter_names(model):
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
        limited("scales", gralora_scale, "gralora_scale")
        models = self._gralora_components(components)
        if adapter_names is not None:
            adapter_names = self._check_gralora_names(adapter_names)
        plan = []
        for component, model in models.items():
            for name, layer in model.named_modules():
                if isinstance(layer, GraloraLayer):
                    todo = [a for a in (adapter_names or layer.active_adapters)
                            if a in layer.gralora_A and a not in layer.merged_adapters]
                    plan += [(f"{component}.{name}", layer, todo)] if todo else []
        for where, layer, todo in plan if safe_fusing else ():
            if not fused_weight_is_finite(layer, todo, gralora_scale):
                raise AdapterFileError(
                    f"{where}: fusing GraLoRA adapter(s) {todo} at scale {gralora_scale} "
                    "gives NaN/Inf weights; the adapter is broken. Nothing was fused."
                )
        sharing = tuners_by_weight(models.values())
        for _, layer, todo in plan:
            fuse_layer(layer, todo, gralora_scale, sharing, exact_unfuse)
        self._sync_merged_adapters()

    def unfuse_gralora(self, components=None) -> None:
        """Undo `fuse_gralora`: base weights back (bit for bit with exact_unfuse) and adapter scales back."""
        models = self._gralora_components(components).values()
        sharing = tuners_by_weight(models)
        for layer in (layer for model in models for layer in gralora_layers(model)):
            unfuse_layer(layer, sharing)
        self._sync_merged_adapters()

    def _sync_merged_adapters(self) -> None:
        """diffusers' own fuse bookkeeping (`fused_loras`, `num_fused_loras`), read from the layers."""
        self._merged_adapters = merged_adapter_names(self._gralora_components().values())

    # -- on / off --------------------------------------------------------------------------------

    def disable_gralora(self) -> None:
        """Run without GraLoRA adapters (fused ones are unfused first); LoRA adapters stay on."""
        self.unfuse_gralora()  # exactly; PEFT's forward would otherwise unmerge by subtraction
        for layer in self._all_gralora_layers():
            layer.enable_adapters(False)

    def enable_gralora(self) -> None:
        for layer in self._all_gralora_layers():
            layer.enable_adapters(True)


def check_adapter_weight(weight, what: str, components: list[str]) -> None:
    """One adapter's weight as `set_gralora_adapters` takes it: None, a finite number, or a dict
    {component: weight} with known component keys, the UNet's possibly diffusers' block dict
    ({"down": ..., "mid": ..., "up": ...}) whose every number is finite. GraloraConfigError otherwise."""
    if not isinstance(weight, dict):
        if weight is not None:
            limited("weight", weight, what)
        return
    unknown = [key for key in weight if key not in components]
    if unknown:
        raise GraloraConfigError(f"{what}: unknown component key(s) {unknown}; valid keys: {components}.")
    for component, value in weight.items():
        if component == "unet":
            _check_leaves(value, f"{what}[{component!r}]")
        elif value is not None:
            limited("weight", value, f"{what}[{component!r}]")


def _check_leaves(value, what: str) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _check_leaves(inner, f"{what}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            _check_leaves(inner, f"{what}[{i}]")
    elif value is not None:
        limited("weight", value, what)


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
