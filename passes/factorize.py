"""Factorize pass: turn a chosen candidate and a dense weight into a BlastLinear / SS1Linear.

Only the chosen candidates are factorized (the estimate pass priced the others). Low rank is
the truncated (whitened, with calibration rows) SVD: exact, no descent. BLAST runs the descent
until it converges (``factorize_blast.DEFAULT_TOL``) or ``Config.steps``. SS1 is the closed-
form projection. Factors go through the run's ``FactorStore`` (live modules, disk cache).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..layers import BlastLinear, SS1Linear
from .calib_stats import calib_digest
from .cost_model import Candidate
from .estimate import lowrank_spectrum
from .factorize_blast import (DEFAULT_TOL, DESCENT_VERSION, MIN_STEPS, BlastFactors, _unit_columns,
                              factorize_blast, output_error)
from .match import LinearSite
from .project_ss1 import project_ss1
from .store import FactorStore


@dataclass(frozen=True)
class Factorized:
    """What the factorize pass made of one site."""

    layer: nn.Module
    weight_error: float
    output_error: Optional[float]   # held-out calibration rows, or the example inputs


def layer_seed(seed: int, name: str) -> int:
    """Every SS1 layer gets its own hash seed, derived from the config's seed and its name."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def is_lowrank(cand: Candidate) -> bool:
    return cand.structure == "blast" and tuple(cand.blocks) == (1, 1)


def lowrank_factors(weight: torch.Tensor, rank: int, calib: Optional[torch.Tensor] = None,
                    blend: float = 0.0) -> BlastFactors:
    """The truncated (whitened) SVD as BLAST factors with one block."""
    A, B, tails = lowrank_spectrum(weight, calib, blend)
    k = min(rank, A.shape[1])
    U, V = A[:, :k], B[:, :k]
    if k < rank:  # more rank than the matrix has: zero columns
        U = torch.cat([U, U.new_zeros(U.shape[0], rank - k)], 1)
        V = torch.cat([V, V.new_zeros(V.shape[0], rank - k)], 1)
    U, S, V = _unit_columns(U[None], torch.ones(1, 1, rank, dtype=U.dtype), V[None])
    we, oe = tails(k)
    out = lambda t: t.to(device=weight.device, dtype=torch.float32).contiguous()
    return BlastFactors(out(U), out(S), out(V), we, oe)


def _settings(site: LinearSite, cand: Candidate, config, calib: Optional[torch.Tensor]) -> dict:
    s = {"structure": cand.structure, "calib": None if calib is None else calib_digest(calib)}
    if calib is not None and cand.structure == "blast" and config.calib_blend:
        s["blend"] = config.calib_blend
    if is_lowrank(cand):
        s.update(blocks=[1, 1], rank=cand.rank, method="svd")
    elif cand.structure == "blast":
        s.update(blocks=list(cand.blocks), rank=cand.rank, steps=config.steps, tol=DEFAULT_TOL,
                 min_steps=MIN_STEPS, descent=DESCENT_VERSION)
    else:
        from ..kernels import ss1_hash

        s.update(compression=cand.compression, seed=layer_seed(config.seed, site.name),
                 hash=ss1_hash.HASH_VERSION)
    return s


def _shapes(site: LinearSite, cand: Candidate) -> dict:
    m, n = site.out_features, site.in_features
    if cand.structure == "blast":
        (b1, b2), r = cand.blocks, cand.rank
        return {"U": (b1, -(-m // b1), r), "S": (b1, b2, r), "V": (b2, -(-n // b2), r)}
    from ..kernels import ss1_hash

    return {"P": (m, ss1_hash.reduced_k(n, cand.compression))}


def _compute(site: LinearSite, cand: Candidate, config, calib) -> dict:
    W = site.linear_weight.detach()
    if is_lowrank(cand):
        f = lowrank_factors(W, cand.rank, calib, config.calib_blend)
        tensors = {"U": f.U, "S": f.S, "V": f.V}
    elif cand.structure == "blast":
        f = factorize_blast(W, cand.blocks, cand.rank, steps=config.steps, calib=calib,
                            tol=DEFAULT_TOL, seed=config.seed, blend=config.calib_blend)
        tensors = {"U": f.U, "S": f.S, "V": f.V}
    else:
        f = project_ss1(W, cand.compression, layer_seed(config.seed, site.name), calib=calib)
        tensors = {"P": f.P}
    return {"tensors": tensors, "meta": {"error": f.error, "output_error": f.output_error}}


def _module(site: LinearSite, cand: Candidate, config, tensors: dict) -> nn.Module:
    W = site.linear_weight
    m, n = W.shape
    has_bias = site.bias is not None
    kw = dict(bias=has_bias, device=W.device, dtype=W.dtype)
    if cand.structure == "blast":
        layer = BlastLinear(n, m, cand.blocks, cand.rank, **kw)
    else:
        layer = SS1Linear(n, m, cand.compression, layer_seed(config.seed, site.name), **kw)
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(layer, name).copy_(value)
        if has_bias:
            layer.bias.copy_(site.bias.detach())
    return layer


def build_layer(site: LinearSite, cand: Candidate, config, store: FactorStore,
                calib: Optional[torch.Tensor] = None,
                example_rows: Optional[torch.Tensor] = None) -> Factorized:
    """The structured module for ``site``. ``calib``: the layer's calibration rows (data-aware;
    its output error is on their held-out part); else ``example_rows`` (the example inputs'
    rows) give the reported output error."""
    settings = _settings(site, cand, config, calib)
    entry = store.factors(site.linear_weight, settings, lambda: _compute(site, cand, config, calib),
                          config.cache_dir, expect=_shapes(site, cand))
    layer = _module(site, cand, config, entry["tensors"])
    store.remember(site.linear_weight, settings, dict(layer.named_parameters()), entry["meta"])
    out_err = entry["meta"].get("output_error")
    if calib is None and example_rows is not None and example_rows.shape[0]:
        W = site.linear_weight.detach().float()
        with torch.no_grad():
            out_err = output_error(example_rows.float(), W, layer.to_dense().float())
    return Factorized(layer, float(entry["meta"]["error"]), out_err)


def refresh_layer(layer: nn.Module, site: LinearSite, cand: Candidate, config,
                  weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Refactorize ``layer`` in place from a changed dense ``weight`` (nn.Linear layout)."""
    fresh = LinearSite(name=site.name, node=site.node, x=site.x, weight=weight, bias=bias,
                       transposed=False, tokens=site.tokens)
    new = build_layer(fresh, cand, config, FactorStore()).layer
    with torch.no_grad():
        for (name, p), q in zip(layer.named_parameters(), new.parameters()):
            p.copy_(q)


__all__ = ["Factorized", "build_layer", "refresh_layer", "layer_seed", "lowrank_factors"]
