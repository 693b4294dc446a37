"""Factor cache: a weight is factorized once per setting, across recompiles and processes.

Keyed by the weight's content hash plus the factorization settings. In memory for the life of
the process (a recompile for a new batch size, or a graph break, finds its factors here), and on
disk as safetensors when a ``cache_dir`` is given. Hashing reads the whole weight, so the hash
of a tensor already seen is remembered while that very tensor is alive and unmodified (a weak
reference plus its ``_version``; an address alone could be reused by a new tensor).
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file


def content_hash(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(data.shape)}|{data.dtype}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


class FactorCache:
    def __init__(self):
        self._memory: dict[str, dict] = {}
        self._hashes: dict[int, tuple] = {}  # id -> (weakref, _version, shape, hash)
        self.hits = 0
        self.misses = 0

    def _weight_hash(self, w: torch.Tensor) -> str:
        seen = self._hashes.get(id(w))
        if seen is not None and seen[0]() is w and seen[1] == w._version and seen[2] == w.shape:
            return seen[3]
        h = content_hash(w)
        try:
            self._hashes[id(w)] = (weakref.ref(w), w._version, w.shape, h)
        except TypeError:  # not weak-referenceable: just don't remember it
            pass
        return h

    def key(self, weight: torch.Tensor, settings: dict) -> str:
        s = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.blake2b(f"{self._weight_hash(weight)}|{s}".encode(),
                               digest_size=16).hexdigest()

    def get_or_compute(self, weight: torch.Tensor, settings: dict,
                       compute: Callable[[], dict], cache_dir: Optional[str] = None) -> dict:
        """``compute()`` returns ``{"tensors": {name: Tensor}, "meta": {name: float|None}}``."""
        k = self.key(weight, settings)
        entry = self._memory.get(k)
        path = os.path.join(cache_dir, f"{k}.safetensors") if cache_dir else None
        if entry is None and path:
            entry = _load(path, weight.device)
        if entry is None:
            self.misses += 1
            entry = compute()
        else:
            self.hits += 1
        if path and not os.path.exists(path):
            _save(path, entry, settings)
        self._memory[k] = entry
        return entry

    def clear(self) -> None:
        self._memory.clear()
        self._hashes.clear()


def _save(path: str, entry: dict, settings: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in entry["tensors"].items()}
    meta = {"meta": json.dumps(entry["meta"]), "settings": json.dumps(settings, default=str)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def _load(path: str, device) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    tensors = {k: v.to(device) for k, v in load_file(path).items()}
    return {"tensors": tensors, "meta": meta}


GLOBAL_CACHE = FactorCache()
