"""Factorize: turn a chosen candidate and a dense weight into a BlastLinear / SS1Linear.

Two uses: a cheap error estimate for every candidate (a short factorization; it feeds the
selection), and the full factorization of the chosen one. Both go through the factor cache.
"""
from __future__ import annotations

import zlib
from typing import Optional

import torch
from torch import nn

from ..layers import BlastLinear, SS1Linear
from .cost_model import Candidate
from .factor_cache import GLOBAL_CACHE, FactorCache
from .factorize_blast import factorize_blast
from .match import LinearSite
from .project_ss1 import project_ss1


def weight_key(weight: torch.Tensor, cache: FactorCache = GLOBAL_CACHE) -> str:
    """Content hash of a weight (memoized while the tensor is alive and unchanged)."""
    return cache._weight_hash(weight)


def layer_seed(seed: int, name: str) -> int:
    """Every SS1 layer gets its own hash seed, derived from the config's seed and its name."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def _settings(site: LinearSite, cand: Candidate, steps: int, seed: int,
              calib: Optional[torch.Tensor]) -> dict:
    s = {"structure": cand.structure, "steps": steps, "calib": None}
    if cand.structure == "blast":
        s.update(blocks=list(cand.blocks), rank=cand.rank)
    else:
        s.update(compression=cand.compression, seed=layer_seed(seed, site.name))
    if calib is not None:
        from .factor_cache import content_hash

        s["calib"] = content_hash(calib)
    return s


def _factors(site: LinearSite, cand: Candidate, steps: int, seed: int,
             calib: Optional[torch.Tensor], cache: FactorCache, cache_dir: Optional[str]) -> dict:
    W = site.linear_weight.detach()

    def compute() -> dict:
        if cand.structure == "blast":
            f = factorize_blast(W, cand.blocks, cand.rank, steps=steps, calib=calib)
            tensors = {"U": f.U, "S": f.S, "V": f.V}
        else:
            f = project_ss1(W, cand.compression, layer_seed(seed, site.name), calib=calib)
            tensors = {"P": f.P}
        return {"tensors": tensors, "meta": {"error": f.error, "output_error": f.output_error}}

    settings = _settings(site, cand, steps, seed, calib)
    return cache.get_or_compute(W, settings, compute, cache_dir)


def estimate_error(site: LinearSite, cand: Candidate, config,
                   cache: FactorCache = GLOBAL_CACHE) -> float:
    """Relative weight error of a candidate after a short factorization (0 for dense)."""
    if cand.structure == "dense":
        return 0.0
    steps = config.estimate_steps if cand.structure == "blast" else 0
    return float(_factors(site, cand, steps, config.seed, None, cache,
                          config.cache_dir)["meta"]["error"])


def build_layer(site: LinearSite, cand: Candidate, config, calib: Optional[torch.Tensor] = None,
                cache: FactorCache = GLOBAL_CACHE) -> tuple[nn.Module, dict]:
    """The structured module for ``site`` and its ``{"error", "output_error"}``."""
    entry = _factors(site, cand, config.steps, config.seed, calib, cache, config.cache_dir)
    t = entry["tensors"]
    W = site.linear_weight
    m, n = W.shape
    has_bias = site.bias is not None
    kw = dict(bias=has_bias, device=W.device, dtype=W.dtype)
    if cand.structure == "blast":
        layer = BlastLinear(n, m, cand.blocks, cand.rank, **kw)
        params = {"U": t["U"], "S": t["S"], "V": t["V"]}
    else:
        layer = SS1Linear(n, m, cand.compression, layer_seed(config.seed, site.name), **kw)
        params = {"P": t["P"]}
    with torch.no_grad():
        for name, value in params.items():
            getattr(layer, name).copy_(value)
        if has_bias:
            layer.bias.copy_(site.bias.detach())
    return layer, dict(entry["meta"])


def refresh_layer(layer: nn.Module, site: LinearSite, cand: Candidate, config,
                  weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Refactorize ``layer`` in place from a changed dense ``weight`` (nn.Linear layout)."""
    fresh = LinearSite(name=site.name, node=site.node, x=site.x, weight=weight, bias=bias,
                       transposed=False, tokens=site.tokens)
    new, _ = build_layer(fresh, cand, config)
    with torch.no_grad():
        for (name, p), q in zip(layer.named_parameters(), new.parameters()):
            p.copy_(q)
