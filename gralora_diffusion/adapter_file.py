"""The adapter file: one safetensors file, PEFT key names, configs in the header.

Keys: `<component>.<module path>.gralora_A` (and `gralora_B`, `gralora_A_general.weight`,
`gralora_B_general.weight`), component one of `unet`, `text_encoder`, `text_encoder_2`; no adapter
name in the key (PEFT's `get_peft_model_state_dict` layout). Header metadata (all strings):
`format` = "gralora-diffusion", `format_version`, `gralora_configs` = JSON {component: config},
and optionally `family` (the base family, bases/: a file loads only into a pipeline of that family),
`base_model`, `instance_prompt`, `training` (JSON), ...

Reading never unpickles: only safetensors is accepted, and every tensor is checked against its
component's config (shapes follow from r, k, hybrid_r), so nothing is inferred from shapes.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter_config import check_header, config_to_header
from .constants import COMPONENTS, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PICKLE_SUFFIXES
from .atomic import atomic_write  # where train/ and hub.py find it
from .errors import AdapterFileError

FORMAT = "gralora-diffusion"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
PEFT_PREFIX = "base_model.model."
# PEFT GraloraConfig settings the file format cannot carry, with the value that is fine.
PEFT_UNSUPPORTED = {"bias": "none", "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}

TENSOR_SUFFIXES = ("gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight")
# The tensor dtypes an adapter may hold (safetensors' header names): float8 has no isfinite, no
# matmul on CPU, and ints are not weights; both are refused from the header, before any read.
FILE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the safetensors header describes it: shape and dtype, nothing read."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class AdapterFile:
    """A checked adapter: per-component PEFT state dicts and config dicts, plus header metadata."""

    state_dicts: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, dict]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<state dict>"
    files: tuple[str, ...] = ()  # the files it was read from (export never writes over them)

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("base_model")


def normalize_module_key(key: str) -> str:
    """A PEFT key as we store it: without PeftModel's `base_model.model.` prefix and without the
    `base_layer` hops that appear when another adapter (a diffusers LoRA) wraps the GraLoRA layer."""
    key = key.removeprefix(PEFT_PREFIX)
    return ".".join(part for part in key.split(".") if part != "base_layer")


def split_module_key(key: str) -> tuple[str, str]:
    """'a.b.to_q.gralora_A_general.weight' -> ('a.b.to_q', 'gralora_A_general.weight')."""
    for suffix in TENSOR_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise KeyError(key)


def by_module(state_dict: dict) -> dict[str, dict]:
    """{module: {suffix: tensor}} of a flat state dict keyed `<module>.<suffix>`."""
    modules: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        module, suffix = split_module_key(key)
        modules.setdefault(module, {})[suffix] = tensor
    return modules


def check_state_dict(state_dict: dict[str, torch.Tensor], config: dict, source: str, component: str) -> None:
    """Every tensor has the shape and dtype the config says, every module is complete, every value
    finite. `state_dict` may hold `TensorSpec`s (the header's shapes, read before any tensor)."""
    k, r, hybrid_r = config["gralora_k"], config["r"], config["hybrid_r"]
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        try:
            module, suffix = split_module_key(key)
        except KeyError:
            hint = " (a LoRA key: load LoRA files with `load_lora_weights`)" if "lora" in key.lower() else ""
            raise AdapterFileError(f"{source}: key {component}.{key} is not a GraLoRA tensor{hint}.") from None
        if not isinstance(tensor, (torch.Tensor, TensorSpec)) or tensor.dtype not in FILE_DTYPES.values():
            raise AdapterFileError(f"{source}: {component}.{key} has dtype {getattr(tensor, 'dtype', type(tensor))}, "
                                   "expected float16, bfloat16, float32 or float64.")
        modules.setdefault(module, {})[suffix] = tensor
    if not modules:
        raise AdapterFileError(f"{source}: component {component!r} has a config but no tensors.")
    for module, tensors in modules.items():
        where = f"{source}: {component}.{module}"
        expected = {"gralora_A", "gralora_B"} | ({"gralora_A_general.weight", "gralora_B_general.weight"} if hybrid_r else set())
        if set(tensors) != expected:
            raise AdapterFileError(
                f"{where} has tensors {sorted(tensors)}, but the header (hybrid_r={hybrid_r}) needs {sorted(expected)}."
            )
        A, B = tensors["gralora_A"], tensors["gralora_B"]
        if A.ndim != 3 or B.ndim != 3 or A.shape[0] != k or B.shape[0] != k or A.shape[2] != r or B.shape[1] != r:
            raise AdapterFileError(
                f"{where}: gralora_A {tuple(A.shape)} / gralora_B {tuple(B.shape)} do not fit the header's "
                f"k={k}, r={r} (expected [k, in/k, r] and [k, r, out/k]). The file is inconsistent or corrupt."
            )
        if hybrid_r:
            in_features, out_features = A.shape[1] * k, B.shape[2] * k
            hA, hB = tensors["gralora_A_general.weight"], tensors["gralora_B_general.weight"]
            if tuple(hA.shape) != (hybrid_r, in_features) or tuple(hB.shape) != (out_features, hybrid_r):
                raise AdapterFileError(
                    f"{where}: hybrid weights {tuple(hA.shape)} / {tuple(hB.shape)} do not fit hybrid_r={hybrid_r}, "
                    f"in={in_features}, out={out_features}."
                )
        for suffix, tensor in tensors.items():
            if isinstance(tensor, torch.Tensor) and not torch.isfinite(tensor).all():
                raise AdapterFileError(f"{where}.{suffix} contains NaN or Inf values; the adapter is broken.")


def _check_is_safetensors(path: Path) -> None:
    if path.is_dir():
        raise AdapterFileError(f"{path} is a folder; pass the adapter file inside it, or load the folder with `load_gralora_weights`.")
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{path}: pickle-based files ({path.suffix}) are refused, because loading them can run code. "
            "Convert the adapter to .safetensors in a trusted environment first."
        )
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterFileError(f"{path}: {size} bytes, too short to be a safetensors file (empty or truncated).")
            (header_len,) = struct.unpack("<Q", head)
            fits = 0 < header_len <= min(size - 8, MAX_HEADER_BYTES)
            header_bytes = f.read(header_len) if fits else b""
    except OSError as err:  # no read permission, a name too long, an I/O error
        raise AdapterFileError(f"{path}: cannot read the file ({err.strerror or err}).") from None
    # A pickle starts with PROTO (0x80, 2..5), a torch.save zip with "PK": say so rather than "corrupt".
    pickled = head[:2] == b"PK" or (head[0] == 0x80 and 2 <= head[1] <= 5)
    if not fits:
        if pickled:
            raise AdapterFileError(f"{path}: this is a pickle/torch.save file, not safetensors; we never unpickle adapter files.")
        raise AdapterFileError(
            f"{path}: the safetensors header claims {header_len} bytes but the file has {size}: truncated or not safetensors."
        )
    try:
        header = json.loads(header_bytes, object_pairs_hook=_refuse_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: JSON nested too deep
        if pickled:
            raise AdapterFileError(f"{path}: this is a pickle/torch.save file, not safetensors; we never unpickle adapter files.") from None
        raise AdapterFileError(f"{path}: the safetensors header is not valid JSON ({err}).") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object.")


def _refuse_duplicate_keys(pairs):
    duplicates = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates[:3]}")
    return dict(pairs)


def _load_safetensors(path: Path, check_header=None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors) of a safetensors file. Every dtype, and `check_header(metadata,
    {key: TensorSpec})` (the shapes against the configs), are checked from the header before any
    tensor is read: a header claiming a huge tensor of the wrong shape costs nothing. Every failure
    becomes an `AdapterFileError` naming the file."""
    source = str(path)
    _check_is_safetensors(path)
    try:
        with safe_open(source, framework="pt") as f:
            metadata = f.metadata() or {}
            specs = {key: _tensor_spec(f, key, source) for key in f.keys()}
            if check_header is not None:
                check_header(metadata, specs)
            tensors = {key: f.get_tensor(key) for key in specs}
    except SafetensorError as err:
        raise AdapterFileError(f"{source}: not a readable safetensors file ({err}).") from None
    except (OSError, ValueError, RuntimeError) as err:
        if isinstance(err, AdapterFileError):
            raise
        raise AdapterFileError(f"{source}: cannot read the file ({type(err).__name__}: {err}).") from None
    return metadata, tensors


def _tensor_spec(f, key: str, source: str) -> TensorSpec:
    view = f.get_slice(key)
    dtype = FILE_DTYPES.get(view.get_dtype())
    if dtype is None:
        raise AdapterFileError(f"{source}: tensor {key} has dtype {view.get_dtype()}; adapter tensors must be "
                               f"{', '.join(FILE_DTYPES)} (float8 and integer tensors are not supported).")
    return TensorSpec(tuple(view.get_shape()), dtype)


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter file written by `save_adapter_file`. Raises `AdapterFileError`."""
    path = Path(path)
    headers = []

    def check_header(metadata, specs):
        headers.append(_read_header(metadata, list(specs), str(path)))
        from_flat_state_dict(specs, headers[0], metadata, str(path))  # shapes and dtypes, nothing read yet

    metadata, tensors = _load_safetensors(path, check_header)
    adapter = from_flat_state_dict(tensors, headers[0], metadata, str(path))
    adapter.files = (str(path),)
    return adapter


def _read_header(metadata: dict, keys: list[str], source: str) -> dict:
    if metadata.get("format") != FORMAT or "gralora_configs" not in metadata:
        if any("lora_" in k or "lora." in k for k in keys) and not any("gralora" in k for k in keys):
            raise AdapterFileError(f"{source} is a LoRA file, not a GraLoRA adapter: load it with diffusers' `load_lora_weights`.")
        raise AdapterFileError(
            f"{source}: no gralora-diffusion header (format/gralora_configs). Files from PEFT's `save_pretrained` "
            "load as a folder (with adapter_config.json); other files cannot be read."
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise AdapterFileError(f"{source}: format_version={metadata.get('format_version')!r} is not an integer.") from None
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{source}: format version {version} is newer than this gralora-diffusion reads ({FORMAT_VERSION}). "
            "Upgrade gralora-diffusion (pip install -U gralora-diffusion)."
        )
    try:
        configs = json.loads(metadata["gralora_configs"])
    except (json.JSONDecodeError, RecursionError) as err:
        raise AdapterFileError(f"{source}: header field gralora_configs is not JSON ({err}).") from None
    if not isinstance(configs, dict) or not configs:
        raise AdapterFileError(f"{source}: header field gralora_configs must be a non-empty JSON object.")
    return configs


def from_flat_state_dict(tensors: dict[str, torch.Tensor], configs: dict, metadata: dict | None = None, source: str = "<state dict>") -> AdapterFile:
    """Split `component.`-prefixed keys per component and check them against the configs."""
    unknown = [c for c in configs if c not in COMPONENTS]
    if unknown:
        raise AdapterFileError(f"{source}: unknown component(s) {unknown} in the configs; expected some of {list(COMPONENTS)}.")
    checked = {c: check_header(configs[c], source, c) for c in configs}
    state_dicts: dict[str, dict[str, torch.Tensor]] = {c: {} for c in checked}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in checked:
            raise AdapterFileError(
                f"{source}: key {key!r} belongs to no configured component ({', '.join(checked)}); "
                "every key starts with unet., text_encoder. or text_encoder_2."
            )
        module_key = normalize_module_key(rest)
        if module_key in state_dicts[component]:
            raise AdapterFileError(f"{source}: key {key!r} repeats {component}.{module_key} (with or without a PEFT prefix).")
        state_dicts[component][module_key] = tensor
    for component, state_dict in state_dicts.items():
        check_state_dict(state_dict, checked[component], source, component)
    return AdapterFile(state_dicts=state_dicts, configs=checked, metadata=dict(metadata or {}), source=source)


def to_flat_state_dict(state_dicts: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype | None = None,
                       source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """`component.`-prefixed keys; with `dtype`, each tensor cast through `cast_checked`."""
    return {
        f"{component}.{key}": (cast_checked(t, dtype, f"{source}: {component}.{key}", AdapterFileError)
                               if dtype is not None else t).detach().contiguous().cpu()
        for component, sd in state_dicts.items()
        for key, t in sd.items()
    }


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype, where: str, error: type[Exception]) -> torch.Tensor:
    """`tensor.to(dtype)`, refused with `error` naming `where` and the largest value when the cast
    turns finite values into inf (fp16 tops out at 65504): a silent inf would give NaN images."""
    out = tensor.to(dtype)
    if out.dtype != tensor.dtype and out.is_floating_point() and not torch.isfinite(out).all() and torch.isfinite(tensor).all():
        largest = float(tensor.detach().abs().max())
        raise error(f"{where}: values up to {largest:.6g} do not fit {str(dtype).removeprefix('torch.')} "
                    f"(largest {torch.finfo(dtype).max:.6g}); keep float32 (or bfloat16) for this adapter.")
    return out


def save_adapter_file(
    path: str | os.PathLike,
    state_dicts: dict[str, dict[str, torch.Tensor]],
    configs: dict,
    base_model: str | None = None,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write {component: PEFT state dict} and {component: config} as one adapter file (atomically)."""
    path = Path(path)
    bad = {k: v for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise AdapterFileError(f"{path}: metadata {str(bad)[:200]}: header keys and values must be strings "
                               "(json.dumps anything else); nothing was written.")
    config_dicts = {c: config_to_header(cfg) for c, cfg in configs.items()}
    adapter = from_flat_state_dict(to_flat_state_dict(state_dicts), config_dicts, source=str(path))  # check before writing
    header = {**(metadata or {}), "format": FORMAT, "format_version": str(FORMAT_VERSION), "gralora_configs": json.dumps(adapter.configs)}
    if base_model:
        header["base_model"] = str(base_model)
    flat = to_flat_state_dict(state_dicts, dtype, str(path))
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=header))
    return path


def collect_adapter(components: dict[str, torch.nn.Module], adapter_name: str = "default"):
    """({component: PEFT state dict}, {component: config dict}) of one adapter, from models that carry it."""
    from peft import get_peft_model_state_dict

    state_dicts, configs = {}, {}
    for component, model in components.items():
        config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
        if model is None or config is None or getattr(config, "peft_type", None) != "GRALORA":
            continue
        state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
        state_dicts[component] = {normalize_module_key(key): tensor for key, tensor in state_dict.items()}
        configs[component] = config_to_header(config)
    if not state_dicts:
        raise AdapterFileError(f"No GraLoRA adapter named {adapter_name!r} in {', '.join(components)}.")
    return state_dicts, configs


def find_peft_folders(folder: str | os.PathLike) -> dict[str, Path]:
    """{component: folder} of a PEFT `save_pretrained` layout: `unet/`, `text_encoder/`,
    `text_encoder_2/` subfolders, or adapter_config.json at the top for the UNet alone."""
    folder = Path(folder)
    found = {c: folder / c for c in COMPONENTS if (folder / c / PEFT_CONFIG_NAME).is_file()}
    if (folder / PEFT_CONFIG_NAME).is_file():
        if found:
            raise AdapterFileError(
                f"{folder}: both a top-level {PEFT_CONFIG_NAME} and component subfolders ({', '.join(found)}); "
                "keep one layout (the top-level one means the UNet alone)."
            )
        found = {"unet": folder}
    return found


def _read_peft_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise AdapterFileError(f"{path}: not a readable JSON file ({err}).") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    peft_type = data.get("peft_type")
    if peft_type != "GRALORA":
        hint = " Load LoRA folders with diffusers' `load_lora_weights`." if peft_type == "LORA" else ""
        raise AdapterFileError(f"{path}: peft_type is {peft_type!r}, not 'GRALORA'.{hint}")
    unsupported = {k: data[k] for k, fine in PEFT_UNSUPPORTED.items() if data.get(k, fine) not in (fine, [], {})}
    if unsupported:
        raise AdapterFileError(
            f"{path}: settings {unsupported} are not supported here (the adapter must be GraLoRA weights on "
            "Linear modules only); retrain without them."
        )
    return data


def read_peft_folder(folder: str | os.PathLike) -> AdapterFile:
    """Read a GraLoRA adapter saved with PEFT's `save_pretrained` (one folder per component, or the
    UNet alone): adapter_config.json + adapter_model.safetensors, keys with or without `base_model.model.`."""
    folder = Path(folder)
    parts = find_peft_folders(folder)
    if not parts:
        raise AdapterFileError(f"{folder}: no {PEFT_CONFIG_NAME} here or in unet/, text_encoder/, text_encoder_2/.")
    tensors, configs, metadata, files = {}, {}, {}, []
    for component, sub in parts.items():
        data = _read_peft_config(sub / PEFT_CONFIG_NAME)
        weights = sub / PEFT_WEIGHTS_NAME
        if not weights.is_file():
            pickled = [p.name for p in sub.glob("adapter_model.*") if p.suffix in PICKLE_SUFFIXES]
            why = f"only {pickled}: pickle files are refused, we never unpickle adapters" if pickled else "missing"
            raise AdapterFileError(f"{weights}: {why}. Save the adapter with safetensors (PEFT's default).")
        config = config_to_header(data)

        def check_shapes(_, specs, component=component, config=config):  # before any tensor is read
            from_flat_state_dict({f"{component}.{key}": spec for key, spec in specs.items()}, {component: config}, source=str(weights))

        _, component_tensors = _load_safetensors(weights, check_shapes)
        tensors.update({f"{component}.{key}": t for key, t in component_tensors.items()})
        configs[component] = config
        files += [str(sub / PEFT_CONFIG_NAME), str(weights)]
        if data.get("base_model_name_or_path"):
            metadata.setdefault("base_model", str(data["base_model_name_or_path"]))
    adapter = from_flat_state_dict(tensors, configs, metadata, str(folder))
    adapter.files = tuple(files)
    return adapter
