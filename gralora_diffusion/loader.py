"""Load, save and steer GraLoRA adapters on a diffusers pipeline: `GraloraLoaderMixin`.

diffusers' `load_lora_weights` builds a `LoraConfig` and cannot read GraLoRA keys, so loading is
ours. Once loaded, an adapter lives in PEFT's layers (our `GraloraLinear`), so diffusers' own
calls (`cross_attention_kwargs={"scale": s}`, `set_adapters`, `fuse_lora`) keep working on it.

This is the pipeline layer, a loop over the pipeline's adapter-bearing components (its
`_lora_loadable_modules`: `unet` or `transformer`, text encoders; as diffusers' `loaders/lora_base.py`): where an adapter comes from is `sources.py`, what happens to
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
from .bases import family_of_pipeline
from .constants import COMPONENTS, WEIGHT_NAME, torch_dtype
from .errors import AdapterFileError, GraloraConfigError
from .hotswap import fit_state_dict
from .inject import check_adapter_name, existing_adapter_names
from .model_ops import (
    check_fits,
    fuse_layer,
    fused_weight_is_finite,
    gralora_adapter_names,
    gralora_layers,
    hotswap_plan,
    load_into_models,
    merged_adapter_names,
    offloading_paused,
    remove_gralora_adapter,
    set_gralora_weights,
    tuners_by_weight,
    unfuse_layer,
)
from .numbers import limited
from .quantize import check_fusable
from .sources import resolve_adapter


class GraloraLoaderMixin:
    """GraLoRA adapter methods for any diffusers pipeline with a `unet` or `transformer` (and text encoders). Mix into a pipeline class, or add to an object with `patch_pipeline`."""

    def _gralora_components(self, components=None) -> dict[str, nn.Module]:
        names = getattr(self, "_lora_loadable_modules", None) or COMPONENTS  # diffusers' own list per pipeline
        present = {c: getattr(m, "_orig_mod", m) for c in names  # torch.compile's wrapper: the model inside
                   if isinstance(m := getattr(self, c, None), nn.Module)}
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
        family = family_of_pipeline(self)
        if family is not None:
            metadata = {"family": family.name, **(metadata or {})}
        path = Path(save_directory) / weight_name
        return save_adapter_file(path, state_dicts, configs, base_model=base_model, metadata=metadata, dtype=dtype)

    def load_gralora_weights(self, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
                             adapter_name: str | None = None, hotswap: bool = False, **kwargs) -> str:
        """Load a GraLoRA adapter; returns its name (auto: default_0, default_1, ... as diffusers names them).

        `hotswap=True`: the adapter's tensors replace those of the loaded adapter `adapter_name` in place
        (see `enable_gralora_hotswap`); what cannot be swapped is refused before anything changes.

        Input: an adapter file; a folder (its pytorch_gralora_weights.safetensors, `weight_name`, a PEFT
        `save_pretrained` layout, or its only .safetensors file); a Hub repo id (hf_hub_download with
        `revision`, `subfolder`, `cache_dir`, `token`, `local_files_only`, `force_download`); an
        `AdapterFile`; or a state dict with `gralora_configs={component: config}` (see
        `adapter_from_state_dict`). Everything is checked before any module changes; a failure leaves
        the pipeline as it was. Pickle files are refused.
        """
        adapter = resolve_adapter(pretrained_model_name_or_path_or_dict, weight_name, **kwargs)
        source = adapter.source
        if hotswap:
            return self._hotswap_gralora(adapter, adapter_name)
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
        steps = self.check_gralora_fits(adapter)  # with enable_gralora_hotswap: padded to the target rank
        with offloading_paused(self):
            load_into_models(steps, adapter_name, source)
        if getattr(self, "_gralora_hotswap_target", None) is not None:
            for layer in self._all_gralora_layers(list(adapter.configs)):
                if adapter_name in layer.scaling:
                    layer.scaling_to_tensor(adapter_name)
        return adapter_name

    def check_gralora_fits(self, adapter) -> list[tuple]:
        """A resolved adapter (`sources.resolve_adapter`) against this pipeline: its family, components,
        module names and shapes (`model_ops.check_fits`), changing nothing; returns the loading steps."""
        source = adapter.source
        check_family(adapter, self)
        present = self._gralora_components()
        absent = [c for c in adapter.configs if c not in present]
        if absent:
            raise AdapterFileError(f"{source}: the adapter has weights for {absent}, but this {type(self).__name__} "
                                   f"has no such component (it has {list(present)}).")
        steps = []
        target = getattr(self, "_gralora_hotswap_target", None)  # enable_gralora_hotswap: pad to the target rank
        for component, header in adapter.configs.items():
            config = config_from_header(header, source, component, base_model=adapter.base_model)
            state_dict = adapter.state_dicts[component]
            check_fits(present[component], component, config, state_dict, source)
            if target is not None:
                hybrid_r = config.hybrid_r if target[1] is None else target[1]
                state_dict, config = fit_state_dict(state_dict, config, target[0], hybrid_r, where=f"{source}: {component}")
            steps.append((component, present[component], config, state_dict))
        return steps

    # -- hot-swap --------------------------------------------------------------------------------

    def enable_gralora_hotswap(self, target_rank: int, target_hybrid_r: int | None = None) -> None:
        """Prepare hot-swapping (`load_gralora_weights(src, adapter_name=..., hotswap=True)`) for a
        compiled pipeline: adapters loaded from now on are zero-padded to `target_rank` (and
        `target_hybrid_r`; default: the first adapter's), which changes no output, and keep their scaling
        in a tensor, so a later swap of any rank up to it, alpha or `set_gralora_adapters` weight does not
        recompile. Call it before the first load and before compiling. diffusers' `enable_lora_hotswap` is
        called too (same target rank), so plain LoRA files hot-swap through `load_lora_weights(..., hotswap=True)`."""
        for name, value in (("target_rank", target_rank), ("target_hybrid_r", target_hybrid_r)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < (name == "target_rank")):
                raise GraloraConfigError(f"{name}={value!r}: give an integer >= {int(name == 'target_rank')}.")
        loaded = {c: names for c, m in self._gralora_components().items() if (names := sorted(existing_adapter_names(m)))}
        if loaded:
            raise GraloraConfigError(f"enable_gralora_hotswap: adapters are loaded already ({loaded}); call it before the "
                                     "first load (and before compiling), or unload them first.")
        if callable(getattr(self, "enable_lora_hotswap", None)) and getattr(self, "_lora_loadable_modules", None):
            self.enable_lora_hotswap(target_rank=target_rank)
        self._gralora_hotswap_target = (target_rank, target_hybrid_r)

    def _hotswap_gralora(self, adapter, adapter_name) -> str:
        """`load_gralora_weights(..., hotswap=True)`: every check and every new tensor first, then copies."""
        source = adapter.source
        loaded = self.list_gralora_adapters()
        if adapter_name not in {n for names in loaded.values() for n in names}:
            raise GraloraConfigError(f"hotswap=True replaces a loaded adapter: adapter_name={adapter_name!r} is not one "
                                     f"(loaded: {loaded}). Load the first adapter without hotswap.")
        if any(layer.merged for layer in self._all_gralora_layers()):
            raise GraloraConfigError("GraLoRA adapters are fused into the weights; call unfuse_gralora() before a hot-swap.")
        carrying = sorted(c for c, names in loaded.items() if adapter_name in names)
        if sorted(adapter.configs) != carrying:
            raise AdapterFileError(f"{source}: has weights for {sorted(adapter.configs)}, but {adapter_name!r} lives in "
                                   f"{carrying}; hot-swap keeps the components. Load it under another adapter_name.")
        present = self._gralora_components()
        plans = []
        for component in carrying:
            model = present[component]
            config = config_from_header(adapter.configs[component], source, component, base_model=adapter.base_model)
            check_fits(model, component, config, adapter.state_dicts[component], source)
            plans.append(hotswap_plan(model, component, adapter_name, config, adapter.state_dicts[component], source))
        for plan in plans:  # nothing can fail from here: shapes, dtypes and values are checked
            plan.apply()
        return adapter_name

    def _next_adapter_name(self) -> str:
        taken = set().union(*(existing_adapter_names(m) for m in self._gralora_components().values()))
        n = len(taken)
        while f"default_{n}" in taken:
            n += 1
        return f"default_{n}"

    # -- per-image adapters ----------------------------------------------------------------------

    def __call__(self, *args, gralora_adapter_names=None, **kwargs):
        """The pipeline's own call; `gralora_adapter_names=[name or None, ...]`, one per prompt, runs each
        prompt's images with that GraLoRA adapter alone (None: the base) in one batch (`mixed_batch`)."""
        if gralora_adapter_names is None:
            return super().__call__(*args, **kwargs)
        from .mixed_batch import per_image_adapters, prompt_count

        prompts = prompt_count(args, kwargs)
        if prompts is not None and prompts != len(gralora_adapter_names):
            raise GraloraConfigError(f"gralora_adapter_names has {len(gralora_adapter_names)} names for {prompts} prompts; "
                                     "give one name (or None for the base) per prompt.")
        with per_image_adapters(self, gralora_adapter_names, kwargs.get("num_images_per_prompt") or 1):
            return super().__call__(*args, **kwargs)

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
        weight changes. A quantized base weight (--quantize_base) is refused in one line, nothing fused:
        fusing would round the base a second time, for good."""
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
        for where, layer, _ in plan:  # a quantized base weight: refused, before any weight changes
            check_fusable(layer, where)
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


def check_family(adapter, pipe) -> None:
    """An adapter made for one family does not load into another: one line naming both. A file without the
    field (written before families existed, or a PEFT folder) is not checked here; check_fits still is."""
    family = family_of_pipeline(pipe)
    made_for = adapter.metadata.get("family")
    if family is not None and made_for and family.name != made_for:
        raise AdapterFileError(f"{adapter.source}: a GraLoRA adapter for {made_for}, but this pipeline is {family.name} "
                               f"({type(pipe).__name__}); load it into a {made_for} base.")


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
        raise GraloraConfigError(f"{type(pipe).__name__} has no {' / '.join(COMPONENTS)} to carry GraLoRA adapters.")
    cls = type(pipe)
    if cls not in _PATCHED_CLASSES:
        # the mixin first: its __call__ (per-image adapters) wraps the pipeline's
        _PATCHED_CLASSES[cls] = type(cls.__name__, (GraloraLoaderMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    pipe.__class__ = _PATCHED_CLASSES[cls]
    return pipe


class GraloraStableDiffusionXLPipeline(GraloraLoaderMixin, StableDiffusionXLPipeline):
    """diffusers' StableDiffusionXLPipeline with the GraLoRA loader methods."""
