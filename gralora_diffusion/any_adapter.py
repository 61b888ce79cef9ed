"""Load either kind of adapter onto a pipeline: a GraLoRA adapter (anything `load_gralora_weights`
reads) or a plain LoRA file (diffusers or kohya keys, e.g. the trainer's `--adapter lora` baseline
`pytorch_lora_weights.safetensors`) through diffusers' own `load_lora_weights`.

The kind is read from the safetensors header and key names, never from file names, and no tensor
is read to decide. A Hub repo id is tried as GraLoRA first, then as LoRA.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .constants import LORA_WEIGHT_NAME, PICKLE_SUFFIXES, WEIGHT_NAME
from .errors import AdapterFileError

GRALORA, LORA, HUB = "gralora", "lora", "hub"
LORA_KEY_MARKS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_linear_layer")


def safetensors_kind(path: Path) -> str:
    """GRALORA or LORA from the header and keys; GRALORA when unsure (its loader explains what is wrong)."""
    from safetensors import safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        return GRALORA
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
    except Exception:  # unreadable or not safetensors: the GraLoRA reader names the exact problem
        return GRALORA
    if "gralora_configs" in metadata or any("gralora_" in k for k in keys):
        return GRALORA
    return LORA if any(mark in k for k in keys for mark in LORA_KEY_MARKS) else GRALORA


def adapter_kind(source) -> tuple[str, str]:
    """(kind, what to load) for a file, a folder or a Hub repo id. kind: GRALORA, LORA or HUB
    (a repo id: decided by trying)."""
    from .adapter_file import find_peft_folders

    if not isinstance(source, (str, os.PathLike)):
        return GRALORA, source  # a state dict or an AdapterFile: load_gralora_weights' other inputs
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / WEIGHT_NAME).is_file() or find_peft_folders(path):
            return GRALORA, str(path)
        if (path / LORA_WEIGHT_NAME).is_file():
            return LORA, str(path / LORA_WEIGHT_NAME)
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            return GRALORA, str(path)  # its error lists the files and what to do
        path = files[0]
    if path.is_file():
        return safetensors_kind(path), str(path)
    return HUB, str(source)


def check_lora_file(path) -> None:
    """A plain LoRA file's numbers at the edge (numbers.py), before diffusers reads it: every alpha a
    finite scalar within `LIMITS["alpha"]`, every other tensor at least 1-D and finite. A NaN alpha
    draws black images; a 0-dim weight is a traceback deep in PEFT."""
    import torch
    from safetensors import SafetensorError, safe_open

    from .numbers import limited

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if key.endswith("alpha"):
                    if tensor.numel() != 1:
                        raise AdapterFileError(f"{path}: {key} has shape {tuple(tensor.shape)}; an alpha is one number.")
                    try:
                        limited("alpha", float(tensor.reshape(())), key, AdapterFileError)
                    except AdapterFileError as err:
                        raise AdapterFileError(f"{path}: {err}") from None
                    continue
                if tensor.dim() == 0 or tensor.numel() == 0:
                    raise AdapterFileError(f"{path}: {key} has shape {tuple(tensor.shape)}; a LoRA weight is a matrix.")
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise AdapterFileError(f"{path}: {key} holds NaN or infinite values; the file is damaged.")
    except SafetensorError as err:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:200]}).") from None


def _load_lora(pipe, path: str, adapter_name: str, hotswap: bool = False) -> None:
    if Path(path).is_file():
        check_lora_file(path)
    try:
        pipe.load_lora_weights(path, adapter_name=adapter_name, **({"hotswap": True} if hotswap else {}))
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterFileError(f"{path}: diffusers' load_lora_weights cannot load this LoRA onto the pipeline "
                               f"({type(err).__name__}: {first[:300]}); is it for this base model?") from None


def load_any_adapter(pipe, source, adapter_name: str, hotswap: bool = False) -> str:
    """Load a GraLoRA or plain LoRA adapter from `source` as `adapter_name`; returns its kind
    (GRALORA or LORA). `pipe` must carry the GraLoRA methods (`gd.patch_pipeline`). `hotswap`: replace
    the loaded adapter `adapter_name` in place (GraLoRA: `load_gralora_weights`; LoRA: diffusers' own
    hotswap, UNet/transformer weights only, after `enable_gralora_hotswap` or diffusers' `enable_lora_hotswap`)."""
    kind, target = adapter_kind(source)
    if kind == GRALORA:
        pipe.load_gralora_weights(target, adapter_name=adapter_name, hotswap=hotswap)
        return GRALORA
    if kind == LORA:
        _load_lora(pipe, target, adapter_name, hotswap)
        return LORA
    try:  # a Hub repo id: our file or PEFT layout first, then diffusers' LoRA file
        pipe.load_gralora_weights(target, adapter_name=adapter_name, hotswap=hotswap)
        return GRALORA
    except AdapterFileError as gralora_error:
        try:
            _load_lora(pipe, target, adapter_name, hotswap)
        except AdapterFileError:
            raise gralora_error from None
        return LORA


def unload_any_adapter(pipe, adapter_name: str, kind: str) -> None:
    """Remove what `load_any_adapter` loaded; the pipeline computes as before it."""
    if kind == GRALORA:
        pipe.delete_gralora_adapters([adapter_name])
    else:
        pipe.delete_adapters([adapter_name])


@contextlib.contextmanager
def loaded_adapter(pipe, source, adapter_name: str):
    """`with loaded_adapter(pipe, path, "a") as kind:` the adapter is active inside, gone after."""
    kind = load_any_adapter(pipe, source, adapter_name)
    try:
        yield kind
    finally:
        unload_any_adapter(pipe, adapter_name, kind)
