"""Hot-swap: put another GraLoRA adapter's tensors into an adapter already loaded, in place, so a
`torch.compile`d model runs the new adapter without recompiling (PEFT's `utils/hotswap.py` for LoRA).

What a compiled graph reads from a GraLoRA layer is its parameters (by identity), their shapes,
`hybrid_r`, and the scaling (a 0-d tensor once hot-swap is on, filled in place). So a swap must keep
every shape: an adapter is first brought to the loaded one's (k, rank, hybrid rank) exactly, then
copied in. Two exact rewrites make that possible:

- rank: each of the k rank-(r/k) slices is padded with zero columns of A and zero rows of B; the
  padding contributes 0 to every output;
- k: a GraLoRA with k₁ dividing k₂ is a GraLoRA with k₂ and rank r·k₂/k₁ (each block of the k₂
  grid is a sub-block of a k₁ block, its rank-(r/k₁) factor the sub-rows of A and sub-columns of B).

The scaling alpha/(r + hybrid_r) is kept by rewriting alpha for the padded rank. Refused, before
anything changes: a k that does not divide the loaded k, a rank or hybrid rank above the loaded
one's, other target modules (`fit_adapter_tensors`, `check_same_modules`).
"""

from __future__ import annotations

import torch
from peft import GraloraConfig

from .adapter_config import make_config, scaling
from .errors import GraloraConfigError


def refine_k(A: torch.Tensor, B: torch.Tensor, k_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same update as GraLoRA (A [k, in/k, r], B [k, r, out/k]) on a k_to grid, k dividing k_to:
    A' [k_to, in/k_to, r·m], B' [k_to, r·m, out/k_to], m = k_to/k, every block's rank r/k."""
    k, i, r = A.shape
    o, m, t = B.shape[2], k_to // k, r // k
    # A'[(n, a)][:, (j, b, s)] = A[n][a-th row chunk, j·t + s]: the same factor for every sub-column b
    A2 = A.view(k, m, i // m, k, 1, t).expand(k, m, i // m, k, m, t).reshape(k_to, i // m, k * m * t)
    # B'[(j, b)][(n, a, s), :] = B[j][n·t + s, b-th column chunk]: the same factor for every sub-row a
    B2 = (B.view(k, k, 1, t, m, o // m).permute(0, 4, 1, 2, 3, 5)
          .expand(k, m, k, m, t, o // m).reshape(k_to, k * m * t, o // m))
    return A2, B2


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad each of the k rank slices of A [k, in/k, r] and B [k, r, out/k] to rank/k."""
    k, i, r = A.shape
    o, t, T = B.shape[2], r // k, rank // k
    A2, B2 = A.new_zeros(k, i, k, T), B.new_zeros(k, k, T, B.shape[2])
    A2[..., :t] = A.view(k, i, k, t)
    B2[:, :, :t] = B.view(k, k, t, o)
    return A2.view(k, i, rank), B2.view(k, rank, o)


def fit_adapter_tensors(tensors: dict[str, torch.Tensor], config: GraloraConfig, k: int, rank: int, hybrid_r: int,
                        where: str) -> dict[str, torch.Tensor]:
    """One module's tensors ({suffix: tensor}, as the file keys them) rewritten to (k, rank, hybrid_r)
    with the same output; GraloraConfigError naming `where` when that is impossible."""
    k1, r1, h1 = config.gralora_k, config.r, config.hybrid_r
    if k % k1:
        raise GraloraConfigError(f"{where}: gralora_k={k1} cannot take the place of k={k}: only a k that divides {k} "
                                 "(a coarser grid) is the same update on the finer grid. Load it under another adapter_name.")
    if r1 * (k // k1) > rank:
        as_k = f" (rank {r1} at k={k1} is rank {r1 * (k // k1)} at k={k})" if k1 != k else ""
        raise GraloraConfigError(f"{where}: rank {r1}{as_k} is above the loaded adapter's rank {rank}; call "
                                 f"enable_gralora_hotswap(target_rank=...) with the highest rank before the first load.")
    if h1 > hybrid_r:
        raise GraloraConfigError(f"{where}: hybrid_r={h1} is above the loaded adapter's hybrid_r={hybrid_r}; call "
                                 "enable_gralora_hotswap(..., target_hybrid_r=...) with the highest one before the first load.")
    A, B = tensors["gralora_A"], tensors["gralora_B"]
    if k1 != k:
        A, B = refine_k(A, B, k)
    out = dict(zip(("gralora_A", "gralora_B"), pad_rank(A, B, rank)))
    if hybrid_r:
        A_g, B_g = tensors.get("gralora_A_general.weight"), tensors.get("gralora_B_general.weight")
        out["gralora_A_general.weight"] = A.new_zeros(hybrid_r, A.shape[1] * k)
        out["gralora_B_general.weight"] = B.new_zeros(B.shape[2] * k, hybrid_r)
        if h1:
            out["gralora_A_general.weight"][:h1] = A_g
            out["gralora_B_general.weight"][:, :h1] = B_g
    return out


def fit_config(config: GraloraConfig, k: int, rank: int, hybrid_r: int) -> GraloraConfig:
    """`config` as the (k, rank, hybrid_r) adapter `fit_adapter_tensors` makes: alpha rewritten so the
    scaling alpha/(r + hybrid_r) is the original one."""
    alpha = scaling(config) * (rank + hybrid_r)
    return make_config(rank, k, alpha, hybrid_r, config.gralora_dropout, target_modules=config.target_modules,
                       base_model=config.base_model_name_or_path)


def fit_state_dict(state_dict: dict, config: GraloraConfig, rank: int, hybrid_r: int, k: int | None = None,
                   where: str = "") -> tuple[dict, GraloraConfig]:
    """A component's state dict and config brought to (k (default: its own), rank, hybrid_r)."""
    from .adapter_file import by_module

    k = config.gralora_k if k is None else k
    if rank % k:
        raise GraloraConfigError(f"{where}: target_rank={rank} is not a multiple of gralora_k={k}; each of the k blocks "
                                 "gets rank target_rank/k. Pick a multiple of k.")
    fitted = {}
    for module, tensors in by_module(state_dict).items():
        for suffix, tensor in fit_adapter_tensors(tensors, config, k, rank, hybrid_r, f"{where}.{module}").items():
            fitted[f"{module}.{suffix}"] = tensor
    return fitted, fit_config(config, k, rank, hybrid_r)


def check_same_modules(file_modules, loaded_modules, where: str, adapter_name: str) -> None:
    """A swap replaces every module's tensors: the new adapter must adapt exactly the loaded one's modules."""
    extra, missing = sorted(set(file_modules) - set(loaded_modules)), sorted(set(loaded_modules) - set(file_modules))
    if extra or missing:
        raise GraloraConfigError(
            f"{where}: the new adapter targets other modules than {adapter_name!r} ({len(extra)} more, e.g. {extra[:2]}; "
            f"{len(missing)} fewer, e.g. {missing[:2]}); hot-swap keeps the modules. Load it under another adapter_name.")
