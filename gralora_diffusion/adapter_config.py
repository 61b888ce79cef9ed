"""The adapter config: PEFT's `GraloraConfig`, built and checked in one place, and its header form.

`make_config` is the only way settings become a config: it checks what PEFT does not (integer
ranks, hybrid_r >= 0, dropout in [0, 1), alpha a finite number (`numbers.finite_number`), a
string target a valid regex) and lets `GraloraConfig.__post_init__`
check k > 0 and r divisible by k, re-raising PEFT's ValueError as a `GraloraConfigError` that
names the argument. The adapter file keeps a config as a small JSON dict (`config_to_header`);
`config_from_header` turns one back into a `GraloraConfig` through `make_config`, so a header is
checked by the same rules as `add_gralora`'s arguments.

alpha defaults to 2·r (the paper's choice) and the scaling is alpha / (r + hybrid_r): both are
written here once (`default_alpha`, `scaling`).
"""

from __future__ import annotations

import re

from peft import GraloraConfig

from .errors import AdapterFileError, GraloraConfigError
from .numbers import finite_number, limited

# The config fields the adapter file keeps; the required ones define the tensor shapes.
REQUIRED_HEADER_FIELDS = ("r", "alpha", "gralora_k", "hybrid_r", "target_modules")
HEADER_FIELDS = (*REQUIRED_HEADER_FIELDS, "gralora_dropout")


def default_alpha(r: int, alpha: float | None = None) -> float:
    """alpha, or the paper's 2·r when it is None."""
    return 2 * r if alpha is None else alpha


def scaling(config) -> float:
    """alpha / (r + hybrid_r) of a `GraloraConfig` or its header dict: the update's factor at strength 1."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
    return get("alpha") / (get("r") + get("hybrid_r"))


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def make_config(r: int = 8, gralora_k: int = 2, alpha: float | None = None, hybrid_r: int = 0, dropout: float = 0.0,
                target_modules=None, base_model: str | None = None) -> GraloraConfig:
    """A checked `GraloraConfig` (alpha None -> 2·r). Raises `GraloraConfigError` naming the argument."""
    if not _is_int(r, 1):
        raise GraloraConfigError(f"r={r!r}: the rank must be an integer >= 1.")
    if not isinstance(gralora_k, int) or isinstance(gralora_k, bool):  # PEFT checks k >= 1
        raise GraloraConfigError(f"gralora_k={gralora_k!r}: k must be an integer >= 1 (2 for r <= 32, 4 for r >= 64).")
    if not _is_int(hybrid_r, 0):
        raise GraloraConfigError(f"hybrid_r={hybrid_r!r}: the hybrid LoRA rank must be an integer >= 0.")
    limited("r", r, "r")  # the stated upper bounds (numbers.LIMITS): a rank of 2**20 only runs out of memory
    limited("hybrid_r", hybrid_r, "hybrid_r")
    if alpha is not None:  # NaN/inf alpha would give NaN images; 1e300 passes isfinite, then exports inf
        limited("alpha", alpha, "alpha (None for 2·r)")
    finite_number(dropout, "dropout", low=0.0, high=1.0, high_open=True)
    if isinstance(target_modules, str):  # PEFT takes a string as a regex: a bad one fails here, not in re
        try:
            re.compile(target_modules)
        except (re.error, RecursionError) as err:
            raise GraloraConfigError(f"target_modules={target_modules[:80]!r} is not a valid regex ({err}).") from None
    try:
        return GraloraConfig(r=r, gralora_k=gralora_k, alpha=default_alpha(r, alpha), hybrid_r=hybrid_r,
                             gralora_dropout=float(dropout), target_modules=target_modules,
                             base_model_name_or_path=base_model)
    except ValueError as err:  # PEFT's __post_init__: k > 0, r % k == 0
        if gralora_k < 1:
            raise GraloraConfigError(
                f"gralora_k={gralora_k!r}: k must be an integer >= 1 (2 for r <= 32, 4 for r >= 64). [peft: {err}]"
            ) from None
        raise GraloraConfigError(
            f"r={r} is not divisible by gralora_k={gralora_k}: each of the k blocks gets rank r/k. "
            f"Pick r as a multiple of {gralora_k}. [peft: {err}]"
        ) from None


def config_to_header(config) -> dict:
    """The fields of a `GraloraConfig` (or a config dict, e.g. PEFT's adapter_config.json) the file keeps."""
    get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    out = {name: get(name) for name in REQUIRED_HEADER_FIELDS}
    out["gralora_dropout"] = float(get("gralora_dropout", 0.0) or 0.0)
    targets = out["target_modules"]
    out["target_modules"] = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return out


def config_from_header(data, source: str, component: str, base_model: str | None = None) -> GraloraConfig:
    """One component's config from a file header (or a dict given with a state dict), checked by
    `make_config`. Raises `AdapterFileError` naming the file and component."""
    where = f"{source}: config of {component!r}"
    if not isinstance(data, dict):
        raise AdapterFileError(f"{where} is {type(data).__name__}, expected a JSON object.")
    missing = [f for f in REQUIRED_HEADER_FIELDS if f not in data]
    unknown = [f for f in data if f not in HEADER_FIELDS]
    if missing or unknown:
        raise AdapterFileError(
            f"{where}: missing fields {missing} / unknown fields {unknown}. Expected {list(HEADER_FIELDS)}; the "
            "file was not written by a compatible gralora-diffusion, re-save it with `save_gralora_weights`."
        )
    targets = data["target_modules"]
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterFileError(f"{where}: target_modules={targets!r} must be a string or a list of strings.")
    if data["alpha"] is None:  # a file records the alpha it was trained with
        raise AdapterFileError(f"{where}: alpha=None is not a number.")
    try:
        return make_config(r=data["r"], gralora_k=data["gralora_k"], alpha=data["alpha"], hybrid_r=data["hybrid_r"],
                           dropout=data.get("gralora_dropout", 0.0), target_modules=targets, base_model=base_model)
    except GraloraConfigError as err:
        raise AdapterFileError(f"{where}: {err}") from None


def check_header(data, source: str, component: str) -> dict:
    """A header config dict, checked and in the form the file keeps."""
    return config_to_header(config_from_header(data, source, component))
