"""Add GraLoRA adapters to a pipeline, a UNet or a text encoder, through PEFT.

We validate everything first (targets exist, are Linear, widths divisible by k, name is free),
then let PEFT inject `GraloraConfig`, then give the new layers our scale-aware class.
"""

from __future__ import annotations

import re
import warnings

import torch.nn as nn
from peft import GraloraConfig, inject_adapter_in_model
from peft.tuners.gralora.layer import Linear as PeftGraloraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

from .adapter_config import make_config
from .constants import COMPONENTS
from .errors import GraloraConfigError
from .layer import GraloraLinear
from .bases import family_of_pipeline


def resolve_targets(targets, presets: dict[str, list[str]]) -> list[str] | str:
    """A preset name, a list of module names, or a regex (any other string) as PEFT takes it."""
    if isinstance(targets, str) and targets in presets:
        return list(presets[targets])
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise GraloraConfigError(
                f"Target {targets!r} is neither a preset ({', '.join(presets)}) nor a valid regex: {err}."
            ) from None
        return targets
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
        return list(targets)
    raise GraloraConfigError(
        f"Targets {targets!r} must be a preset ({', '.join(presets)}), a list of module names or a regex."
    )


def plain_modules(model: nn.Module):
    """(name, module) pairs, with adapter layers standing for their base layer and their
    own submodules (base_layer, gralora_A_general, …) left out."""
    inside = None  # the prefix of the adapter layer being skipped: named_modules walks depth-first, so its
    for name, module in model.named_modules():  # submodules come right after it (linear, not modules x layers)
        if not name or (inside is not None and name.startswith(inside)):
            continue
        if isinstance(module, BaseTunerLayer):
            inside = name + "."
            module = module.get_base_layer()
        yield name, module


def _nearby_linears(model: nn.Module, limit: int = 16) -> str:
    """Short names of the Linear modules (last one or two name parts), to suggest targets."""
    short = set()
    for name, module in plain_modules(model):
        if isinstance(module, nn.Linear):
            parts = name.split(".")
            short.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return ", ".join(sorted(short)[:limit])


def check_config(model: nn.Module, config: GraloraConfig, component: str, adapter_name: str | None = None) -> dict[str, nn.Module]:
    """Check a config against a model before anything is injected: `adapter_name` (if given) is free,
    the targets match modules, all of them Linear, with widths divisible by k. Returns the modules
    PEFT would adapt; a module that already carries an adapter counts by its base layer, the
    adapter's own submodules are skipped. (r, k, hybrid_r themselves: `make_config`.)"""
    if adapter_name is not None and adapter_name in existing_adapter_names(model):
        raise GraloraConfigError(
            f"{component}: an adapter named {adapter_name!r} already exists. Pick another adapter_name, "
            f"or delete it first; the existing adapter was left untouched."
        )
    matched = {name: module for name, module in plain_modules(model) if check_target_module_exists(config, name)}
    if not matched:
        raise GraloraConfigError(
            f"{component}: target modules {config.target_modules!r} match no module. "
            f"Linear modules that exist here (by last name): {_nearby_linears(model)}."
        )
    not_linear = {n: type(m).__name__ for n, m in matched.items() if not isinstance(m, nn.Linear)}
    if not_linear:
        shown = ", ".join(f"{n} ({t})" for n, t in list(not_linear.items())[:5])
        raise GraloraConfigError(
            f"{component}: GraLoRA adapts nn.Linear only, but the targets {config.target_modules!r} match "
            f"{len(not_linear)} other module(s): {shown}. Linear modules that exist here: {_nearby_linears(model)}."
        )
    k = config.gralora_k
    for name, module in matched.items():
        if module.in_features % k or module.out_features % k:
            raise GraloraConfigError(
                f"{component}.{name}: Linear {module.in_features}->{module.out_features} is not divisible by "
                f"gralora_k={k}. Use a k that divides both widths, or leave this module out of the targets."
            )
    return matched


def upgrade_gralora_layers(model: nn.Module) -> int:
    """Give PEFT's GraLoRA layers our subclass (scale control). Same state, so a class swap is
    enough; PEFT has no hook to make its injector build a subclass. Returns the number upgraded."""
    count = 0
    for module in model.modules():
        if type(module) is PeftGraloraLinear:
            module.__class__ = GraloraLinear
            count += 1
    return count


def existing_adapter_names(model: nn.Module) -> set[str]:
    names = set(getattr(model, "peft_config", {}) or {})
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            names.update(module._get_available_adapters() if hasattr(module, "_get_available_adapters") else ())
    return names


def inject_config(model: nn.Module, config: GraloraConfig, adapter_name: str, low_cpu_mem_usage: bool = False) -> None:
    """Inject an already validated config and make the adapter active, the way diffusers'
    and transformers' `add_adapter` do (so their `set_adapters`, `fuse_lora`, … see it)."""
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = True
    with warnings.catch_warnings():
        # A second adapter beside the first is what we mean to do; PEFT warns about it.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    upgrade_gralora_layers(model)
    for module in model.modules():
        # GraLoRA layers only: a diffusers LoRA loaded beside keeps its own active adapters.
        if isinstance(module, GraloraLinear):
            module.set_adapter(adapter_name)


def check_adapter_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise GraloraConfigError(f"adapter_name={adapter_name!r}: use a non-empty string without dots.")
    if hasattr(nn.ParameterDict(), adapter_name) or hasattr(nn.ModuleDict(), adapter_name):
        # PEFT keeps the weights in ParameterDicts keyed by adapter name: 'half', 'to', ... clash
        raise GraloraConfigError(f"adapter_name={adapter_name!r} is the name of a torch Module attribute; pick another.")


def component_presets(family, component: str, is_denoiser: bool) -> dict[str, list[str]]:
    """The family's presets for `component`; SDXL's (UNet / CLIP) for pipelines no family knows."""
    from .bases import DEFAULT_FAMILY, get_family

    if family is not None and component in family.module.PRESETS:
        return family.presets(component)
    sdxl = get_family(DEFAULT_FAMILY)
    return sdxl.presets("unet" if is_denoiser else "text_encoder")


def presets_for_model(model: nn.Module, is_text: bool) -> dict[str, list[str]]:
    """A bare UNet / transformer / text encoder: the presets of the first family that declares its class."""
    from .bases import component_of_model, family_of_model

    family = family_of_model(model)
    component = component_of_model(family, model) if family else None
    return component_presets(family, component, not is_text) if component else component_presets(None, "", not is_text)


def add_gralora(
    pipe_or_model,
    r: int = 8,
    gralora_k: int = 2,
    alpha: float | None = None,
    hybrid_r: int = 0,
    dropout: float = 0.0,
    unet_targets="attn",
    text_encoder_targets=None,
    adapter_name: str = "default",
) -> dict[str, GraloraConfig]:
    """Add a GraLoRA adapter to a pipeline (its denoiser, UNet or transformer, with `unet_targets`;
    and, if `text_encoder_targets`, its adapter-bearing text encoders), or to a bare UNet / transformer /
    text encoder. Presets are the pipeline family's (`bases`). Returns {component: GraloraConfig}.

    Everything is checked before any module changes: a bad argument leaves the model as it was.
    """
    check_adapter_name(adapter_name)
    if isinstance(pipe_or_model, nn.Module):
        is_text = hasattr(pipe_or_model, "config") and hasattr(pipe_or_model.config, "vocab_size")
        presets = presets_for_model(pipe_or_model, is_text)
        wanted = [(type(pipe_or_model).__name__, pipe_or_model, (text_encoder_targets or "attn") if is_text else unet_targets, presets)]
    else:
        family = family_of_pipeline(pipe_or_model)
        denoiser = family.denoiser if family else "unet"
        names = family.components if family else getattr(pipe_or_model, "_lora_loadable_modules", COMPONENTS)
        wanted = [(c, m, unet_targets if c == denoiser else text_encoder_targets, component_presets(family, c, c == denoiser))
                  for c in names if isinstance(m := getattr(pipe_or_model, c, None), nn.Module)]
        wanted = [w for w in wanted if w[0] == denoiser or text_encoder_targets is not None]
        if not wanted:
            raise GraloraConfigError(f"{type(pipe_or_model).__name__} has no {denoiser} or text encoder to adapt.")
    configs = {}
    for component, model, targets, presets in wanted:
        config = make_config(r, gralora_k, alpha, hybrid_r, dropout, target_modules=resolve_targets(targets, presets))
        check_config(model, config, component, adapter_name)
        configs[component] = config
    for component, model, *_ in wanted:
        inject_config(model, configs[component], adapter_name)
    return configs
