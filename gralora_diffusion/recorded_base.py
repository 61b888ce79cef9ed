"""Bases remembered: what an adapter records as its base, and the base a command uses when no --base is
given. A local folder is recorded as its absolute path (a relative one found nothing from another
folder); `tiny`, `world` and Hub ids as given. `hub_id` names the Hub model a base stands for, which a
model card's `base_model` must be (a local path or `tiny` is no model id)."""

from __future__ import annotations

from pathlib import Path


def record(spec) -> str | None:
    """The base as an adapter file records it."""
    if spec is None:
        return None
    from .bases import embedded_names

    spec = str(spec)
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec not in embedded_names() and path.exists() else spec


def hub_id(spec) -> str | None:
    """The Hub model id a base stands for: a Hub id as given; a local folder or file inside the Hugging
    Face cache (`models--org--name/snapshots/<revision>/...`) by its cache folder's name (a repo id never
    holds `--`, so the name maps back exactly); None for `tiny`, `world` and any other local path."""
    if spec is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .bases import embedded_names

    spec = str(spec)
    if spec in embedded_names():
        return None
    path = Path(spec).expanduser()
    if not path.exists():
        try:
            validate_repo_id(spec)
        except HFValidationError:
            return None
        return spec
    path = path.absolute()  # not resolve(): the cache's files are links into blobs/
    for folder in path.parents:
        if folder.name == "snapshots" and folder.parent.name.startswith("models--"):
            return folder.parent.name[len("models--"):].replace("--", "/")
    return None


def recorded_base(source) -> str | None:
    """The base a GraLoRA adapter file records (its header only, no tensor read); None for a LoRA file,
    a Hub id or an adapter without one."""
    from safetensors import safe_open

    from .any_adapter import GRALORA, adapter_kind

    kind, target = adapter_kind(source)
    path = Path(str(target))
    if kind != GRALORA or not path.is_file() or path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get("base_model")
    except Exception:  # noqa: BLE001 - an unreadable file: its loader names the problem later
        return None
    return value or None


def default_base(sources, fallback: str = "tiny", say=print) -> str:
    """The first recorded base among `sources` (GraLoRA adapters), else `fallback`; says which, once."""
    for source in sources:
        base = recorded_base(source)
        if base:
            if say:
                say(f"Base model: {base} (recorded in {source}; --base chooses another)")
            return base
    return fallback
