"""Per-component report of the GraLoRA adapters in a pipeline or model."""

from __future__ import annotations

import torch.nn as nn
from peft.tuners.gralora.layer import GraloraLayer

from .constants import COMPONENTS


def _components(pipe_or_model) -> dict[str, nn.Module]:
    if isinstance(pipe_or_model, nn.Module):
        return {type(pipe_or_model).__name__: pipe_or_model}
    return {c: getattr(pipe_or_model, c) for c in COMPONENTS if getattr(pipe_or_model, c, None) is not None}


def adapter_summary(pipe_or_model) -> dict[str, dict[str, dict]]:
    """{component: {adapter_name: {modules, params, trainable_params, r, k, hybrid_r, alpha, effective_rank}}}.

    `params` counts the adapter's own parameters: r·(in+out) per module, plus hybrid_r·(in+out).
    """
    report: dict[str, dict[str, dict]] = {}
    for component, model in _components(pipe_or_model).items():
        adapters: dict[str, dict] = {}
        for module in model.modules():
            if not isinstance(module, GraloraLayer):
                continue
            for name in module.gralora_A:
                entry = adapters.setdefault(
                    name,
                    {
                        "modules": 0,
                        "params": 0,
                        "trainable_params": 0,
                        "r": module.r[name],
                        "k": module.gralora_k[name],
                        "hybrid_r": module.hybrid_r[name],
                        "alpha": module.alpha[name],
                        "effective_rank": module.gralora_k[name] * module.r[name] + module.hybrid_r[name],
                    },
                )
                entry["modules"] += 1
                for attr in GraloraLayer.adapter_layer_names:
                    holder = getattr(module, attr)
                    if name in holder:
                        for p in holder[name].parameters() if isinstance(holder[name], nn.Module) else [holder[name]]:
                            entry["params"] += p.numel()
                            entry["trainable_params"] += p.numel() if p.requires_grad else 0
        if adapters:
            report[component] = adapters
    return report


def format_summary(report: dict[str, dict[str, dict]]) -> str:
    """A plain-text table of `adapter_summary`."""
    header = f"{'component':<16}{'adapter':<12}{'modules':>8}{'params':>12}{'r':>5}{'k':>4}{'hybrid':>7}{'alpha':>7}{'rank':>6}"
    lines = [header, "-" * len(header)]
    for component, adapters in report.items():
        for name, e in adapters.items():
            lines.append(
                f"{component:<16}{name:<12}{e['modules']:>8}{e['params']:>12,}{e['r']:>5}{e['k']:>4}"
                f"{e['hybrid_r']:>7}{e['alpha']:>7g}{e['effective_rank']:>6}"
            )
    return "\n".join(lines)
