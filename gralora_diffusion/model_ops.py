"""What GraLoRA adapters do to one model (a UNet or a text encoder): check that an adapter fits,
inject it with rollback, remove it, fuse and unfuse it, set adapter weights. The pipeline layer
(`loader.GraloraLoaderMixin`) loops over components and calls these, as diffusers' pipeline
loaders (`loaders/lora_base.py`) call its model loaders (`loaders/peft.py`).

Fusing keeps one explicit `FuseState` per GraLoRA layer (`layer.gralora_fuse_state`): the
adapters' scalings before the fuse, an optional CPU copy of the base weight, what this layer
merged, and what the other adapter layers on the same weight (a LoRA nested with it) had merged
then. Unfusing restores the copy only when that is all still so; else it subtracts.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
from peft import GraloraConfig, set_peft_model_state_dict
from peft.tuners.gralora.layer import GraloraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from .adapter_file import by_module, normalize_module_key
from .errors import AdapterFileError, GraloraConfigError
from .inject import check_config, inject_config, plain_modules


def gralora_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, GraloraLayer)]


def gralora_adapter_names(model: nn.Module) -> list[str]:
    """The GraLoRA adapters in a model's `peft_config` (LoRA adapters beside are left out)."""
    configs = getattr(model, "peft_config", None) or {}
    return [name for name, cfg in configs.items() if str(getattr(cfg, "peft_type", "")).endswith("GRALORA")]


# -- load: check, inject with rollback, remove --------------------------------------------------


def check_fits(model: nn.Module, component: str, config: GraloraConfig, state_dict: dict, source: str) -> None:
    """Every module with weights exists here, is a Linear of the widths the tensors imply, and the
    config's target_modules select exactly those modules (so injection creates no weightless layer)."""
    modules = dict(plain_modules(model))
    weighted = by_module(state_dict)
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
    matched = set(check_config(model, config, component))
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


def remove_gralora_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete one GraLoRA adapter from a model; GraLoRA layers left without adapters give their
    place back to their base layer (the original module object, or a LoRA layer wrapping it)."""
    for layer in gralora_layers(model):
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


# One load at a time in this process: PEFT's injection and `warnings.catch_warnings` touch
# process-wide state, and two interleaved loads must not see each other's half-done changes.
_LOAD_LOCK = threading.Lock()


def load_into_models(steps: list[tuple[str, nn.Module, GraloraConfig, dict]], adapter_name: str, source: str) -> None:
    """Inject and fill one adapter into several models, (component, model, config, state dict) each,
    already checked with `check_fits`; on any failure every model is put back as it was.

    Thread-safe: loads are serialized, and injection does not use PEFT's low_cpu_mem_usage, whose
    `init_empty_weights` patches `nn.Module.register_parameter` for the whole process while it runs (a
    module built in another thread meanwhile lands on the meta device, and two overlapping patches
    restore each other's patch, leaving the process patched for good). Fresh layers cost one init of
    the adapter's size (no measurable difference on the tiny pipeline: 0.13 s both ways); the file's
    tensors are then assigned, not copied."""
    with _LOAD_LOCK:
        states = [_ModelState(model) for _, model, _, _ in steps]
        done = []
        try:
            for component, model, config, state_dict in steps:
                done.append((component, model))
                inject_config(model, config, adapter_name)
                result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name, low_cpu_mem_usage=True)
                empty = [n for n, p in model.named_parameters() if p.is_meta]
                if result.unexpected_keys or empty:
                    raise AdapterFileError(
                        f"{source}: {component}: PEFT did not place every tensor (unexpected keys "
                        f"{result.unexpected_keys[:3]}, weights left empty {empty[:3]})."
                    )
                check_cast(model, component, adapter_name, state_dict, source)
        except BaseException as err:
            for (_, model), state in zip(done, states):
                remove_gralora_adapter(model, adapter_name)
                state.restore()
            if isinstance(err, Exception) and not isinstance(err, (AdapterFileError, GraloraConfigError)):
                raise AdapterFileError(
                    f"{source}: loading into {done[-1][0]} failed ({type(err).__name__}: {err}); "
                    "the adapter was removed again and the pipeline is unchanged."
                ) from err
            raise


def check_cast(model: nn.Module, component: str, adapter_name: str, state_dict: dict, source: str) -> None:
    """The file's tensors are finite (checked on read); PEFT casts them to the model's dtype, and in an
    fp16 pipeline values beyond 65504 become inf without a word. Refuse, naming the module and value."""
    for name, param in model.named_parameters():
        parts = name.split(".")  # ...to_q.gralora_A.<adapter> or ...to_q.gralora_A_general.<adapter>.weight
        at = next((i for i in range(1, len(parts)) if parts[i] == adapter_name and parts[i - 1].startswith("gralora_")), None)
        if at is not None and not torch.isfinite(param).all():
            key = normalize_module_key(".".join(parts[:at] + parts[at + 1 :]))
            largest = float(state_dict[key].abs().max()) if key in state_dict else float("nan")
            raise AdapterFileError(
                f"{source}: {component}.{key}: values up to {largest:.6g} do not fit this pipeline's "
                f"{str(param.dtype).removeprefix('torch.')} (largest {torch.finfo(param.dtype).max:.6g}); load it into a "
                "float32 (or bfloat16) pipeline. Nothing was loaded."
            )


@contextlib.contextmanager
def offloading_paused(pipe):
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


# -- hot-swap -------------------------------------------------------------------------------------


@dataclass
class HotswapPlan:
    """What a hot-swap writes into one model, every tensor already in its parameter's shape, dtype and
    device, so `apply` cannot fail half-way."""

    model: nn.Module
    adapter_name: str
    config: GraloraConfig  # the loaded adapter's config once swapped (the new one's, at the loaded shapes)
    copies: list  # (parameter, tensor)
    layers: list  # GraLoRA layers carrying the adapter
    scaling: float

    def apply(self) -> None:
        with torch.no_grad():
            for param, tensor in self.copies:
                param.copy_(tensor)
        for layer in self.layers:
            layer.alpha[self.adapter_name] = self.config.alpha
            layer.assign_scaling(self.adapter_name, self.scaling)  # strength 1, as PEFT's hotswap sets it
        self.model.peft_config[self.adapter_name] = self.config


def hotswap_plan(model: nn.Module, component: str, adapter_name: str, config: GraloraConfig, state_dict: dict,
                 source: str) -> HotswapPlan:
    """Check that adapter (config, state dict, already `check_fits`) can take `adapter_name`'s place in
    this model and bring its tensors to the loaded shapes (`hotswap.fit_adapter_tensors`). Changes nothing."""
    from .adapter_config import scaling
    from .hotswap import check_same_modules, fit_adapter_tensors, fit_config

    where = f"{source}: {component}"
    layers = {normalize_module_key(name): m for name, m in model.named_modules()
              if isinstance(m, GraloraLayer) and adapter_name in m.gralora_A}
    modules = by_module(state_dict)
    check_same_modules(modules, layers, where, adapter_name)
    loaded = model.peft_config[adapter_name]
    k, rank, hybrid_r = loaded.gralora_k, loaded.r, loaded.hybrid_r
    copies = []
    for name, tensors in modules.items():
        layer = layers[name]
        fitted = fit_adapter_tensors(tensors, config, k, rank, hybrid_r, f"{where}.{name}")
        params = {"gralora_A": layer.gralora_A[adapter_name], "gralora_B": layer.gralora_B[adapter_name]}
        if hybrid_r:
            params["gralora_A_general.weight"] = layer.gralora_A_general[adapter_name].weight
            params["gralora_B_general.weight"] = layer.gralora_B_general[adapter_name].weight
        for suffix, param in params.items():
            tensor = fitted[suffix].to(device=param.device, dtype=param.dtype)
            if tensor.shape != param.shape:
                raise AdapterFileError(f"{where}.{name}.{suffix}: shape {tuple(tensor.shape)} at the loaded k and rank, "
                                       f"but the loaded adapter's is {tuple(param.shape)}: another base model.")
            if not torch.isfinite(tensor).all():
                raise AdapterFileError(f"{where}.{name}.{suffix}: values up to {float(fitted[suffix].abs().max()):.6g} do "
                                       f"not fit this pipeline's {str(param.dtype).removeprefix('torch.')}; nothing was swapped.")
            copies.append((param, tensor))
    return HotswapPlan(model, adapter_name, fit_config(config, k, rank, hybrid_r), copies, list(layers.values()),
                       scaling(config))


# -- weights --------------------------------------------------------------------------------------


class _OnlyGraloraLayers:
    """What diffusers' `set_weights_and_activate_adapters` needs of a model, `named_modules()`, with
    the GraLoRA layers only: so its weight logic (per-block dicts included) is reused as is, and a LoRA
    loaded beside keeps its own active adapters and weights."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_modules(self):
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, GraloraLayer)]


def set_gralora_weights(model: nn.Module, names: list[str], weights: list) -> None:
    """Activate `names` at `weights` (floats, or the UNet's block dicts) on a model's GraLoRA layers,
    through diffusers' own scale expansion and activation; LoRA layers are left alone."""
    from diffusers.loaders.peft import _SET_ADAPTER_SCALE_FN_MAPPING
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    weights = _SET_ADAPTER_SCALE_FN_MAPPING[type(model).__name__](model, [1.0 if w is None else w for w in weights])
    set_weights_and_activate_adapters(_OnlyGraloraLayers(model), names, weights)


# -- fuse -----------------------------------------------------------------------------------------


def tuners_by_weight(models) -> dict[int, list]:
    """Adapter layers grouped by the base Linear they wrap (a LoRA and a GraLoRA layer nested on one
    module share it, whichever wraps the other); keyed by id() of that Linear."""
    groups: dict[int, list] = {}
    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                groups.setdefault(id(module.get_base_layer()), []).append(module)
    return groups


def _others_merged(layer, sharing) -> tuple:
    """(other adapter layer, what it has merged) for every other adapter layer on this layer's weight."""
    return tuple((t, tuple(t.merged_adapters)) for t in sharing.get(id(layer.get_base_layer()), []) if t is not layer)


@dataclass
class FuseState:
    """How to undo `fuse_layer` on one GraLoRA layer."""

    scaling: dict[str, float]  # every adapter's scaling before the first fuse
    backup: torch.Tensor | None  # CPU copy of the base weight (exact_unfuse), else None
    merged: list[str]  # what this layer had merged after the last fuse
    others: tuple  # _others_merged at the first fuse

    def restores_exactly(self, layer, sharing) -> bool:
        """The backup is still the weight minus this layer's merge: nothing else merged or unmerged since."""
        return (self.backup is not None and self.merged == layer.merged_adapters
                and self.others == _others_merged(layer, sharing))


def fuse_layer(layer, adapters: list[str], scale: float, sharing, exact_unfuse: bool) -> None:
    """Merge `adapters` into the layer's base weight at `scale` times their current scalings."""
    state = getattr(layer, "gralora_fuse_state", None)
    if state is None or not layer.merged:  # first fuse on this layer: remember how to undo it
        backup = layer.get_base_layer().weight.detach().to("cpu", copy=True) if exact_unfuse else None
        scalings = {a: float(v) for a, v in layer.scaling.items()}  # values: a tensor scaling changes in place
        state = layer.gralora_fuse_state = FuseState(scalings, backup, [], _others_merged(layer, sharing))
    for adapter in adapters:
        layer.assign_scaling(adapter, layer.scaling[adapter] * scale)
    layer.merge(adapter_names=adapters)
    state.merged = list(layer.merged_adapters)


def fused_weight_is_finite(layer, adapters: list[str], scale: float) -> bool:
    """Whether merging `adapters` at `scale` would leave the weight free of NaN/Inf (nothing changes)."""
    with torch.no_grad():
        fused = layer.get_base_layer().weight.detach().clone()
        for adapter in adapters:
            fused += layer.get_delta_weight(adapter) * scale
    return bool(torch.isfinite(fused).all())


def unfuse_layer(layer, sharing) -> None:
    """Unmerge one GraLoRA layer: from the CPU copy when `FuseState.restores_exactly` (bit-exact),
    else by subtraction; then the pre-fuse scalings return."""
    state = layer.__dict__.pop("gralora_fuse_state", None)
    if layer.merged:
        if state is not None and state.restores_exactly(layer, sharing):
            with torch.no_grad():
                layer.get_base_layer().weight.copy_(state.backup)
            layer.merged_adapters.clear()
        else:
            layer.unmerge()
    if state is not None:
        for adapter, scaling in state.scaling.items():
            if adapter in layer.scaling:
                layer.assign_scaling(adapter, scaling)


def merged_adapter_names(models) -> set[str]:
    """Every adapter (GraLoRA or LoRA) merged into some weight of these models."""
    return {a for model in models for t in model.modules() if isinstance(t, BaseTunerLayer) for a in t.merged_adapters}
