"""Cached VAE latents and text embeddings: in memory while they fit, then on disk as safetensors.

`TensorCache` is dict-like (`key in cache`, `cache[key]`, `cache[key] = tensors`). Entries go to
memory until `budget_mb` is used, later ones to `<folder>/<namespace>/<sha256 of key>.safetensors`.
The namespace is a fingerprint of what made the tensors (the encoder's weights, dtype, and for
latents the training images), computed the first time anything is written to disk: a changed model
or dataset gets a fresh namespace, so stale files are never read. Files are written through a
temporary name and renamed, so a killed run leaves none half-written and several processes may share
the folder. Not `diskcache`/`joblib.Memory`: they pickle, and this project never loads a pickle.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def module_fingerprint(*modules, extra: str = "") -> str:
    """A short hash of modules' weights (name, dtype, shape, bytes) and `extra`."""
    digest = hashlib.sha256(extra.encode())
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


class TensorCache:
    def __init__(self, budget_mb: int, folder: Path | None, namespace: Callable[[], str]):
        self.budget, self.used = budget_mb * 2**20, 0
        self.folder, self._namespace, self._dir = folder, namespace, None
        self.memory: dict[Hashable, tuple[torch.Tensor, ...]] = {}
        self.on_disk = 0  # entries written to disk by this process

    def _path(self, key: Hashable) -> Path | None:
        if self.folder is None:
            return None
        if self._dir is None:
            self._dir = Path(self.folder) / self._namespace()
        return self._dir / f"{hashlib.sha256(repr(key).encode()).hexdigest()}.safetensors"

    def __contains__(self, key: Hashable) -> bool:
        if key in self.memory:
            return True
        # the disk is looked at only once memory is full (before that nothing was written there by us,
        # and a file left by an earlier run with the same model and data is as good: read it)
        return self.used >= self.budget and (path := self._path(key)) is not None and path.is_file()

    def __getitem__(self, key: Hashable) -> tuple[torch.Tensor, ...]:
        if key in self.memory:
            return self.memory[key]
        tensors = load_file(self._path(key))
        return tuple(tensors[str(i)] for i in range(len(tensors)))

    def __setitem__(self, key: Hashable, tensors: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        path = None if self.used + size <= self.budget else self._path(key)
        if path is None:
            self.memory[key] = tensors
            self.used += size
            return
        self.used = max(self.used, self.budget)  # memory is full: later lookups check the disk
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(tensors)}, str(tmp))
        os.replace(tmp, path)
        self.on_disk += 1
