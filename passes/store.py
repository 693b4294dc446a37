"""The factor store: what one compression run (or one compiled model) knows about its layers.

Owned by the run, not by the process: ``compress`` makes a fresh one unless the caller passes
one in (``compress(..., store=s)`` reuses it across calls), and each ``structfx.backend(...)``
owns one for the graphs it compiles (a graph compiled again for new shapes finds the earlier
decisions there). It holds:

* error estimates as floats (every candidate of every layer: a few numbers each);
* decisions, keyed by the weight's content and every decision-relevant ``Config`` field;
* factors only for the chosen candidates, as *weak* references to the tensors of the modules
  built from them: a recompile of a live model copies them instead of factorizing again, and
  nothing is kept alive once the model is gone;
* optionally a disk cache (``cache_dir``): safetensors files keyed by weight content plus
  the factorization settings, every loaded entry validated (names, shapes, dtype, finite
  values, settings) and recomputed with a warning if anything is off; written atomically
  under a unique temporary name, an unwritable directory is a warning, never an error.

Hashing reads the whole weight, so a tensor's hash is remembered while that very tensor is
alive and unmodified (a weak reference plus its ``_version``; an address alone could be
reused by a new tensor).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import threading
import warnings
import weakref
from typing import Callable, Optional

import torch

# Config fields that don't change what is decided or factorized.
NOT_DECISIONS = frozenset({"report", "progress", "strict", "on_stale", "stale_check",
                           "cache_dir", "calib_memory"})
FORMAT = 2   # disk-cache entry format


def content_hash(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(data.shape)}|{data.dtype}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def decision_settings(config) -> str:
    """Every decision-relevant field of ``config``, canonically (the memo's key part)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in NOT_DECISIONS}
    return json.dumps(fields, sort_keys=True, default=repr)


class FactorStore:
    def __init__(self):
        self._lock = threading.RLock()
        self._hashes: dict[int, tuple] = {}      # id -> (weakref, probe, shape, hash)
        self.estimates: dict[str, tuple] = {}     # candidate key -> (weight err, output err)
        self.decisions: dict[tuple, object] = {}  # (weight hash, settings) -> Decision record
        self._factors: dict[str, dict] = {}       # factor key -> {name: weakref(Tensor)}, meta
        self.factorizations = 0                   # full factorizations computed
        self.estimations = 0                      # estimate computations (one per curve)
        self.hits = 0

    # ------------------------------------------------------------------ keys
    def weight_hash(self, w: torch.Tensor) -> str:
        with self._lock:
            seen = self._hashes.get(id(w))
            probe = _probe(w)
            if seen is not None and seen[0]() is w and seen[1] == probe and seen[2] == w.shape:
                return seen[3]
            h = content_hash(w)
            try:
                self._hashes[id(w)] = (weakref.ref(w), probe, w.shape, h)
            except TypeError:  # not weak-referenceable: just don't remember it
                pass
            return h

    def key(self, weight: torch.Tensor, settings: dict) -> str:
        s = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.blake2b(f"{self.weight_hash(weight)}|{s}".encode(),
                               digest_size=16).hexdigest()

    # ------------------------------------------------------------------ estimates
    def estimate(self, key: str, compute: Callable[[], tuple]) -> tuple:
        with self._lock:
            if key in self.estimates:
                return self.estimates[key]
        value = compute()
        with self._lock:
            self.estimations += 1
            self.estimates[key] = value
        return value

    # ------------------------------------------------------------------ factors
    def factors(self, weight: torch.Tensor, settings: dict, compute: Callable[[], dict],
                cache_dir: Optional[str] = None, expect: Optional[dict] = None) -> dict:
        """``{"tensors": {name: Tensor}, "meta": {...}}`` for ``settings``: from a live module
        built earlier, the disk cache, or ``compute()``. ``expect``: ``{name: shape}`` every
        loaded entry must match."""
        k = self.key(weight, settings)
        with self._lock:
            live = self._factors.get(k)
        if live is not None:
            tensors = {n: r() for n, r in live["tensors"].items()}
            if all(t is not None for t in tensors.values()):
                self.hits += 1
                return {"tensors": {n: t.detach().clone() for n, t in tensors.items()},
                        "meta": dict(live["meta"])}
        path = os.path.join(cache_dir, f"{k}.safetensors") if cache_dir else None
        entry = _load(path, weight.device, settings, expect) if path else None
        if entry is None:
            entry = compute()
            with self._lock:
                self.factorizations += 1
            if path:
                _save(path, entry, settings)
        else:
            self.hits += 1
        return entry

    def remember(self, weight: torch.Tensor, settings: dict, tensors: dict, meta: dict) -> None:
        """Note the tensors of a module built for ``settings`` (weakly) for later recompiles."""
        try:
            refs = {n: weakref.ref(t) for n, t in tensors.items()}
        except TypeError:
            return
        with self._lock:
            self._factors[self.key(weight, settings)] = {"tensors": refs, "meta": dict(meta)}

    def clear(self) -> None:
        with self._lock:
            self._hashes.clear()
            self.estimates.clear()
            self.decisions.clear()
            self._factors.clear()
            self.factorizations = self.estimations = self.hits = 0


def _probe(w: torch.Tensor) -> tuple:
    """What must be unchanged for a remembered hash to stand: the version counter, the storage
    (``w.data = new``) and 64 sampled elements (``w.data.mul_(2)`` moves no version counter)."""
    flat = w.detach().reshape(-1)
    idx = torch.linspace(0, max(flat.numel() - 1, 0), min(64, flat.numel())).long()
    sample = flat[idx.to(flat.device)].cpu()
    return (w._version, w.data_ptr(), bytes(sample.view(torch.uint8).numpy()) if flat.numel()
            else b"")


# ---------------------------------------------------------------------------- disk cache
def _save(path: str, entry: dict, settings: dict) -> None:
    from safetensors.torch import save_file

    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in entry["tensors"].items()}
        meta = {"meta": json.dumps(entry["meta"]), "format": str(FORMAT),
                "settings": json.dumps(settings, sort_keys=True, default=str)}
        fd, tmp = tempfile.mkstemp(prefix=".structfx-", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(f"structfx: could not write the factor cache {path!r} ({e}); "
                      f"continuing without it", stacklevel=3)


def _load(path: str, device, settings: dict, expect: Optional[dict]) -> Optional[dict]:
    """A validated cache entry, or None (with a warning if a file was there but unusable)."""
    if not os.path.exists(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            info = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        problem = _validate(info, tensors, settings, expect)
    except Exception as e:  # a truncated or garbage file: any reader error
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem:
        warnings.warn(f"structfx: ignoring the factor cache entry {path!r}: {problem}; "
                      f"recomputing it", stacklevel=3)
        return None
    return {"tensors": {k: v.to(device) for k, v in tensors.items()},
            "meta": json.loads(info["meta"])}


def _validate(info: dict, tensors: dict, settings: dict, expect: Optional[dict]) -> str:
    if "meta" not in info or "settings" not in info:
        return "no structfx metadata"
    if info.get("format") != str(FORMAT):
        return f"format {info.get('format')!r}, expected {FORMAT}"
    if json.loads(info["settings"]) != json.loads(json.dumps(settings, sort_keys=True,
                                                             default=str)):
        return "its settings differ from the requested ones"
    meta = json.loads(info["meta"])
    if not isinstance(meta, dict) or not all(
            v is None or (isinstance(v, (int, float)) and math.isfinite(v))
            for v in meta.values()):
        return "bad error values in its metadata"
    if expect is not None:
        if set(tensors) != set(expect):
            return f"tensors {sorted(tensors)}, expected {sorted(expect)}"
        for name, shape in expect.items():
            if tuple(tensors[name].shape) != tuple(shape):
                return f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}"
    for name, t in tensors.items():
        if not t.is_floating_point():
            return f"{name} has dtype {t.dtype}, expected floating point"
        if not torch.isfinite(t).all():
            return f"{name} holds NaN or inf"
    return ""
