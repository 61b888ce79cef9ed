"""Export a GraLoRA adapter as a plain LoRA file that stock diffusers, ComfyUI and A1111 load
(a plain LoRA source, the trainer's `--adapter lora` baseline, is re-keyed or truncated the same way:
`lora_source.py`).

Exact (rank=None): every GraLoRA block (out j, in n) is the rank-t product
`s · (A[n][:, j·t:(j+1)·t] @ B[j][n·t:(n+1)·t, :])ᵀ` (DESIGN.md §1), so stacking the k² block
factors gives one `down [k·r, in]` (block-sparse rows) and one `up [out, k·r]`; the hybrid branch
appends its `hybrid_r` rows/columns. The scaling s is folded into `up`, so the file's alpha/rank
scale is 1: diffusers files say `lora_alpha = r` in `lora_adapter_metadata`, kohya files carry an
`alpha` tensor equal to the rank. No loader guesses.

Truncated (rank=N): the best rank-N approximation of that ΔW (float32 SVD, taken on the small
core of the QR factors, so a 10240x1280 module costs a (k·r)² SVD), with the kept energy
Σ_{i≤N} σ_i² / Σ σ_i² per module and overall; relative Frobenius error = sqrt(1 - energy).

Key names (diffusers' and kohya's layouts): `export_names.py`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapter_config import scaling
from .adapter_file import AdapterFile, atomic_write, cast_checked, split_module_key
from .constants import KOHYA_WEIGHT_NAME, torch_dtype
from .constants import LORA_WEIGHT_NAME as DIFFUSERS_WEIGHT_NAME
from .errors import ExportError
from .export_names import module_path, resolve_layers_per_block, to_kohya
from .lora_source import is_lora_config, lora_modules, module_scale, read_lora_source
from .numbers import finite_number
from .sources import resolve_adapter

FORMATS = ("diffusers", "kohya")


@dataclass
class ModuleExport:
    component: str
    module: str
    in_features: int
    out_features: int
    exact_rank: int  # k·r + hybrid_r
    rank: int  # rank written
    energy: float  # kept fraction of Σσ² (1.0 when exact)
    total_energy: float = field(default=0.0, repr=False)  # Σσ² = ||ΔW||_F², for the overall figure


@dataclass
class ExportReport:
    path: str
    format: str
    dtype: str
    requested_rank: int | None
    size_bytes: int
    modules: list[ModuleExport]

    @property
    def exact(self) -> bool:
        return all(m.rank >= m.exact_rank for m in self.modules)

    @property
    def overall_energy(self) -> float:
        total = sum(m.total_energy for m in self.modules)
        return 1.0 if total == 0 else sum(m.energy * m.total_energy for m in self.modules) / total

    def ranks(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for m in self.modules:
            out.setdefault(m.component, []).append(m.rank)
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "exact": self.exact, "overall_energy": self.overall_energy}

    def __str__(self) -> str:
        lines = [f"Wrote {self.path} ({self.format} LoRA, {self.dtype}, {format_size(self.size_bytes)})"]
        for component, ranks in self.ranks().items():
            shown = ", ".join(f"{r}" for r in sorted(set(ranks)))
            lines.append(f"  {component}: {len(ranks)} modules, rank {shown}")
        if self.exact:
            lines.append("  exact: the LoRA's ΔW equals the source's ΔW (closed form, no SVD)")
        else:
            lines.append(f"  SVD rank {self.requested_rank}: kept energy {self.overall_energy:.6f} overall "
                         f"(relative error of ΔW {math.sqrt(max(0.0, 1 - self.overall_energy)):.4f})")
            worst = sorted(self.modules, key=lambda m: m.energy)[:3]
            for m in worst:
                lines.append(f"    lowest: {m.component}.{m.module} energy {m.energy:.6f}")
        return "\n".join(lines)


def format_size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def exact_rank(config: dict) -> int:
    """Rank of the plain LoRA that equals a GraLoRA module exactly: k·r + hybrid_r (a LoRA source: r)."""
    if is_lora_config(config):
        return config["r"]
    return config["gralora_k"] * config["r"] + config["hybrid_r"]


def group_modules(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {tensor suffix: tensor}} from a PEFT GraLoRA state dict."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, suffix = split_module_key(key)
        modules.setdefault(module, {})[suffix] = tensor
    return dict(sorted(modules.items()))


def _modules(state_dict: dict, config: dict) -> dict[str, dict[str, torch.Tensor]]:
    return lora_modules(state_dict) if is_lora_config(config) else group_modules(state_dict)


def _features(tensors: dict, config: dict) -> tuple[int, int]:
    """(in, out) of the adapted Linear."""
    if is_lora_config(config):
        return tensors["lora_A.weight"].shape[1], tensors["lora_B.weight"].shape[0]
    k = config["gralora_k"]
    return tensors["gralora_A"].shape[1] * k, tensors["gralora_B"].shape[2] * k


def lora_factors(tensors: dict[str, torch.Tensor], config: dict, module: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(down [k·r + hybrid_r, in], up [out, k·r + hybrid_r]) in float32 with up @ down == ΔW
    (PEFT's `get_delta_weight`, scaling included). Closed form: block factors copied, no SVD.
    A LoRA source: its own factors, alpha / r folded into up."""
    if is_lora_config(config):
        return tensors["lora_A.weight"].float(), tensors["lora_B.weight"].float() * module_scale(config, module)
    A, B = tensors["gralora_A"].float(), tensors["gralora_B"].float()  # [k, in/k, r], [k, r, out/k]
    k, in_k, r = A.shape
    out_k, t = B.shape[2], r // k
    s = scaling(config)
    down = A.new_zeros(k * r, k * in_k)
    up = A.new_zeros(k * out_k, k * r)
    for j in range(k):  # output block
        for n in range(k):  # input block
            m = (j * k + n) * t  # rank slot of block (j, n)
            down[m : m + t, n * in_k : (n + 1) * in_k] = A[n][:, j * t : (j + 1) * t].T
            up[j * out_k : (j + 1) * out_k, m : m + t] = B[j][n * t : (n + 1) * t, :].T * s
    if config["hybrid_r"]:
        down = torch.cat([down, tensors["gralora_A_general.weight"].float()], dim=0)
        up = torch.cat([up, tensors["gralora_B_general.weight"].float() * s], dim=1)
    return down, up


def truncate(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-`rank` approximation of up @ down (float32 SVD of the QR core).
    Returns (down, up, kept energy, total energy ||ΔW||_F²); the singular values are split
    evenly (√σ on each side) so neither factor overflows in fp16."""
    Qu, Ru = torch.linalg.qr(up.float())  # up = Qu Ru
    Qd, Rd = torch.linalg.qr(down.float().T)  # downᵀ = Qd Rd  ->  ΔW = Qu (Ru Rdᵀ) Qdᵀ
    U, S, Vh = torch.linalg.svd(Ru @ Rd.T, full_matrices=False)
    rank = min(rank, S.numel())
    root = S[:rank].sqrt()
    new_up = (Qu @ U[:, :rank]) * root
    new_down = root[:, None] * (Vh[:rank] @ Qd.T)
    energies = S.double() ** 2
    total = float(energies.sum())
    kept = 1.0 if total == 0 else float(energies[:rank].sum() / total)
    return new_down.contiguous(), new_up.contiguous(), kept, total


# --- export ----------------------------------------------------------------------------------


def resolve_dtype(dtype, adapter: AdapterFile) -> torch.dtype:
    if dtype is None:
        return next(iter(next(iter(adapter.state_dicts.values())).values())).dtype
    return torch_dtype(dtype, ExportError)


def _check_rank(rank) -> None:
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ExportError(f"rank={rank!r}: the LoRA rank must be an integer >= 1 (or omitted for the exact export).")


def _export_ranks(adapter: AdapterFile, rank: int | None) -> list[tuple[str, str, dict, int, int, int]]:
    """(component, module, tensors, in, out, rank written) for every module; checks `rank` first."""
    _check_rank(rank)
    plan = []
    for component, state_dict in adapter.state_dicts.items():
        config = adapter.configs[component]
        for module, tensors in _modules(state_dict, config).items():
            in_f, out_f = _features(tensors, config)
            if rank is not None and rank > min(in_f, out_f):
                raise ExportError(
                    f"rank={rank} is larger than {component}.{module} allows ({in_f}->{out_f}: at most "
                    f"{min(in_f, out_f)}). Pick a rank <= {min(in_f, out_f)}, or omit --rank for the exact export "
                    f"(rank {exact_rank(config)})."
                )
            written = exact_rank(config) if rank is None else min(rank, exact_rank(config))
            plan.append((component, module, tensors, in_f, out_f, written))
    return plan


def estimate_size(adapter: AdapterFile, rank: int | None = None, dtype=None, format: str = "diffusers") -> int:
    """Bytes of the tensors an export would write (the header adds a few kB)."""
    itemsize = torch.empty((), dtype=resolve_dtype(dtype, adapter)).element_size()
    plan = _export_ranks(adapter, rank)
    alpha_bytes = 4 if format == "kohya" else 0  # kohya's alpha scalars are float32 whatever the weights' dtype
    return sum(r * (i + o) * itemsize + alpha_bytes for _, _, _, i, o, r in plan)


def _diffusers_metadata(entries: dict[str, list[tuple[str, int]]]) -> dict:
    """diffusers' `lora_adapter_metadata`: `<component>.<LoraConfig field>`, alpha = rank (scale 1)."""
    meta = {}
    for component, modules in entries.items():
        # Text encoders: paths without `text_model.`: PEFT matches targets and patterns by suffix,
        # so they fit CLIP with and without that wrapper (transformers 5 flattens CLIPTextModel).
        modules = [(name.removeprefix("text_model."), rank) for name, rank in modules]
        r = collections.Counter(rank for _, rank in modules).most_common(1)[0][0]
        pattern = {name: rank for name, rank in modules if rank != r}
        targets = sorted(name for name, _ in modules)
        meta.update({
            f"{component}.r": r, f"{component}.lora_alpha": r, f"{component}.target_modules": targets,
            f"{component}.rank_pattern": pattern, f"{component}.alpha_pattern": pattern,
        })
    return meta


def _convert(adapter: AdapterFile, plan, format: str, rank: int | None, out_dtype, lpb):
    """The LoRA tensors, a ModuleExport per module, and {component: [(module, rank)]} for the header."""
    tensors: dict[str, torch.Tensor] = {}
    modules: list[ModuleExport] = []
    entries: dict[str, list[tuple[str, int]]] = {}
    for component, module, parts, in_f, out_f, written in plan:
        config = adapter.configs[component]
        down, up = lora_factors(parts, config, module)
        if rank is None:  # ||up @ down||_F² from the two small Gram matrices, without forming ΔW
            energy, total = 1.0, float(((up.T @ up).double() * (down @ down.T).double()).sum())
        else:
            down, up, energy, total = truncate(down, up, written)
        where = f"{adapter.source}: {component}.{module}"
        down = cast_checked(down, out_dtype, f"{where} (lora_A)", ExportError).contiguous()
        up = cast_checked(up, out_dtype, f"{where} (lora_B, the scaling folded in)", ExportError).contiguous()
        name = module_path(component, module, format, lpb)
        tensors[f"{component}.{name}.lora_A.weight"] = down
        tensors[f"{component}.{name}.lora_B.weight"] = up
        entries.setdefault(component, []).append((name, written))
        modules.append(ModuleExport(component, module, in_f, out_f, exact_rank(config), written, energy, total))
    return (to_kohya(tensors) if format == "kohya" else tensors), modules, entries


def check_not_source(dst: Path, adapter: AdapterFile) -> None:
    """Refuse a destination that is one of the files the adapter was read from, however it is
    spelled: the file, its folder's file, a PEFT folder's adapter_model.safetensors or
    adapter_config.json, through symlinks, `..` or a hard link. Nothing is written."""
    from .outputs import check_output_file, same_file

    sources = [Path(f) for f in adapter.files] or [Path(str(adapter.source))]
    for source in sources:
        if same_file(dst, source):  # through symlinks, `..` and hard links
            raise ExportError(f"{dst} is {source}, a file of the source adapter; pick another output path. Nothing was written.")
    # the output rule (outputs.py): a new file, or an export of ours; never a link, never someone else's file
    check_output_file(dst, "export-lora: the destination", owned=is_our_export, error=ExportError)


def is_our_export(path) -> bool:
    """A LoRA file export_lora wrote (its header says so), which a new export may replace."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "gralora_export" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not ours
        return False


def _read_source(src) -> AdapterFile:
    """A GraLoRA adapter (anything `load_gralora_weights` reads), or a plain LoRA file in diffusers'
    layout (`lora_source`), told apart by `any_adapter.adapter_kind` (header and keys)."""
    from .any_adapter import LORA, adapter_kind

    if isinstance(src, (str, os.PathLike)):
        kind, target = adapter_kind(src)
        if kind == LORA:
            return read_lora_source(target)
    return resolve_adapter(src)


@contextlib.contextmanager
def _one_thread():
    """Per-module work here is a few small matrices (k·r ≤ a few hundred): intra-op threads buy nothing,
    and on a busy machine their spin-waits made a 560-module SDXL export 20x slower (31 s vs 1.7 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kohya_rules(adapter: AdapterFile) -> dict:
    """The adapter's family's kohya/ComfyUI rules (bases/<family>.py KOHYA); refused where none are defined.
    A file without a family field is an SDXL one (written before families existed)."""
    from .bases import DEFAULT_FAMILY, get_family

    family = get_family(adapter.metadata.get("family") or DEFAULT_FAMILY)
    if family.kohya is None:
        raise ExportError(f"{adapter.source}: a {family.name} adapter; kohya/ComfyUI key names are written here for "
                          "sdxl only. Export with --format diffusers (diffusers' load_lora_weights reads it).")
    return family.kohya


def export_lora(
    src,
    dst,
    format: str = "diffusers",
    rank: int | None = None,
    dtype=None,
    max_size: int | None = None,
    layers_per_block: int | None = None,
) -> ExportReport:
    """Write a GraLoRA adapter as a plain LoRA safetensors file.

    src: anything `load_gralora_weights` reads (adapter file, its folder, a PEFT `save_pretrained`
    folder, a Hub repo id, an `AdapterFile`). dst: file path, or an
    existing folder (then `pytorch_lora_weights.safetensors` / `lora_kohya.safetensors` inside).
    rank=None: exact (rank k·r + hybrid_r); rank=N: SVD-truncated to N. dtype: fp32/fp16/bf16 (default:
    the adapter's). max_size: bytes; a larger export is refused before anything is written.
    layers_per_block: the UNet's (kohya names only; default from the base model's config, else read off
    the adapter's names where unambiguous, else refused). The destination may not be a file of the
    source (checked through symlinks and `..`); a cast to fp16 that overflows is refused, naming the module.
    """
    # the arguments first: nonsense fails before the adapter is read or downloaded
    if format not in FORMATS:
        raise ExportError(f"format={format!r}: pick one of {', '.join(FORMATS)}.")
    _check_rank(rank)
    if dtype is not None:
        resolve_dtype(dtype, None)  # checks the name; only dtype=None needs the adapter
    if max_size is not None:
        finite_number(max_size, "max_size (bytes)", ExportError, low=0, low_open=True)
    if layers_per_block is not None and (not isinstance(layers_per_block, int) or isinstance(layers_per_block, bool)
                                         or layers_per_block < 1):
        raise ExportError(f"layers_per_block={layers_per_block!r}: the UNet's layers per block, an integer >= 1 (SDXL: 2).")
    dst = Path(dst)
    blocker = next((p for p in [dst.parent, *dst.parent.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ExportError(f"{dst}: {blocker} is a file, not a folder; pick an output path in a folder.")
    adapter = _read_source(src)
    kohya = kohya_rules(adapter) if format == "kohya" else None
    out_dtype = resolve_dtype(dtype, adapter)
    if dst.is_dir():
        dst = dst / (DIFFUSERS_WEIGHT_NAME if format == "diffusers" else KOHYA_WEIGHT_NAME)
    check_not_source(dst, adapter)
    plan = _export_ranks(adapter, rank)
    estimate = estimate_size(adapter, rank, out_dtype, format)
    if max_size is not None and estimate > max_size:
        raise ExportError(
            f"The {format} export of {adapter.source} would be {format_size(estimate)}, more than the "
            f"{format_size(max_size)} allowed. Use a smaller --rank (SVD) or --dtype fp16, or raise --max-size. "
            "Nothing was written."
        )
    lpb = resolve_layers_per_block(adapter, layers_per_block) if format == "kohya" else None

    with _one_thread():
        tensors, modules, entries = _convert(adapter, plan, format, rank, out_dtype, lpb)

    header = {"format": "pt", "gralora_export": json.dumps({
        "source_format_version": adapter.metadata.get("format_version"), "base_model": adapter.base_model,
        "rank": rank, "exact": rank is None or all(m.rank >= m.exact_rank for m in modules),
        "gralora_configs": adapter.configs})}
    if adapter.base_model:
        header["base_model"] = adapter.base_model
    if adapter.metadata.get("family"):
        header["family"] = adapter.metadata["family"]
    if format == "diffusers":
        header["lora_adapter_metadata"] = json.dumps(_diffusers_metadata(entries), sort_keys=True)
    else:  # the kohya/sd-scripts fields A1111 and ComfyUI show
        header.update({"ss_network_module": "networks.lora", "ss_base_model_version": kohya["ss_base_model_version"],
                       "ss_network_dim": str(max(m.rank for m in modules)), "ss_network_alpha": str(max(m.rank for m in modules))})

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=header)
        size = os.path.getsize(tmp)
        if max_size is not None and size > max_size:
            raise ExportError(f"The export is {format_size(size)}, more than the {format_size(max_size)} allowed; nothing was written.")

    atomic_write(dst, write)
    return ExportReport(str(dst), format, str(out_dtype).removeprefix("torch."), rank, dst.stat().st_size, modules)
