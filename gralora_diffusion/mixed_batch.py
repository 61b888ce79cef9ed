"""Per-image adapters: one GraLoRA adapter (or None, the base) per prompt of one pipeline call,
`pipe(prompts, gralora_adapter_names=["cat", "dog", None])`.

diffusers' pipelines do not pass PEFT's `adapter_names` to the layers, so for the call every
component carrying GraLoRA layers (found from the pipeline, whichever family it is) gets a forward
pre-hook that reads the batch size of its input and maps it to one name per row, and each of its
GraLoRA layers a pre-hook that hands those names to the layer (PEFT's own mechanism for LoRA's
mixed batches). The layer groups the rows per adapter (`GraloraLinear.forward`).

A model's batch is one of: the prompts (text encoders, B rows), the images (B·N with
`num_images_per_prompt` N, prompt-major as diffusers repeats them), or the images doubled by
classifier-free guidance (2·B·N: the negative half, then the positive half, as diffusers
concatenates them). A negative prompt is encoded with its image's adapter, as in a pipeline that
carries that adapter alone. During the call the named adapters are the active ones, so a per-call
`cross_attention_kwargs={"scale": s}` scales them all; LoRA layers loaded beside act on every row.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import GraloraConfigError
from .model_ops import gralora_layers


def rows_for(names: list, per_prompt: int, batch: int, component: str) -> list:
    """One adapter name per row of a `batch`-row input of `component`."""
    images = [name for name in names for _ in range(per_prompt)]
    if batch == len(names):
        return list(names)
    if batch == len(images):
        return images
    if batch == 2 * len(images):
        return images + images
    raise GraloraConfigError(
        f"gralora_adapter_names: {component} was called with a batch of {batch}, which is neither the {len(names)} "
        f"prompts, their {len(images)} images, nor {2 * len(images)} (guidance's doubled batch); this pipeline batches "
        "differently, so per-image adapters cannot be mapped to its rows.")


def _batch_size(args, kwargs) -> int:
    """Rows of a model call: the first dimension of its first tensor argument (latents, input ids, hidden states)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    raise GraloraConfigError("gralora_adapter_names: a model was called without a tensor argument to tell its batch.")


def check_names(pipe, names) -> list:
    """A list of loaded, unfused GraLoRA adapter names or None, one per prompt."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise GraloraConfigError(f"gralora_adapter_names={names!r}: give a list with one adapter name (or None) per prompt.")
    named = sorted({n for n in names if n is not None})
    if named:
        pipe._check_gralora_names(named)
    fused = sorted({a for layer in pipe._all_gralora_layers() for a in layer.merged_adapters})
    if fused:
        raise GraloraConfigError(f"gralora_adapter_names: adapter(s) {fused} are fused into the weights and would act on "
                                 "every image; call unfuse_gralora() first.")
    return list(names)


@contextlib.contextmanager
def per_image_adapters(pipe, names, num_images_per_prompt: int = 1):
    """Inside, every call of the pipeline's models runs row i with adapter `names[i]`'s update (None: none)."""
    names = check_names(pipe, names)
    current: dict[str, list] = {}
    handles, active = [], {}

    def model_hook(component):
        def hook(module, args, kwargs):
            current[component] = rows_for(names, num_images_per_prompt, _batch_size(args, kwargs), component)
        return hook

    def layer_hook(component):
        def hook(module, args, kwargs):
            return args, {**kwargs, "adapter_names": current[component]}
        return hook

    try:
        for component, model in pipe._gralora_components().items():
            layers = gralora_layers(model)
            if not layers:
                continue
            handles.append(model.register_forward_pre_hook(model_hook(component), with_kwargs=True))
            for layer in layers:
                handles.append(layer.register_forward_pre_hook(layer_hook(component), with_kwargs=True))
                # active = the named adapters, for scale_layer; set directly: PEFT's set_adapter also flips requires_grad
                active[layer] = layer._active_adapter
                layer._active_adapter = [n for n in dict.fromkeys(names) if n in layer.gralora_A]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, adapters in active.items():
            layer._active_adapter = adapters


def prompt_count(args, kwargs) -> int | None:
    """How many prompts a pipeline call gets: its `prompt` (a string is one), else its `prompt_embeds`' rows."""
    prompt = kwargs.get("prompt", args[0] if args else None)
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    embeds = kwargs.get("prompt_embeds")
    return embeds.shape[0] if isinstance(embeds, torch.Tensor) else None
