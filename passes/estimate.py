"""Estimate pass: the error of every candidate of a layer, without factorizing each one.

* Low rank (BLAST with b = 1): one SVD prices every rank exactly. Data-free, the SVD of ``W``
  (the error at rank ``k`` is the tail of its spectrum); data-aware, the SVD of the whitened
  ``W K`` (``K K^T`` the Gram of the fit rows), whose truncation is the output-optimal rank-k
  layer (SVD-LLM); its held-out output error for every ``k`` is a weighted tail sum.
* BLAST at b >= 2 (``factorize_blast.blast_error_curve``), per (layer, b), not per candidate:
  data-free, short runs at two anchor ranks, the others read off the weight's singular values
  through them; data-aware, one factorization at the grid's largest rank, cut to each smaller
  rank, never above the low-rank error at the same rank (the final's start).
* SS1: the projection is closed form; it is the estimate.

With calibration rows a candidate is priced by its output error on the held-out rows (the one
rule, ``calib_stats``); data-free, by its weight error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .calib_stats import calib_stats
from .factorize_blast import LOWRANK_RIDGE, blast_error_curve, blend_gram
from .project_ss1 import project_ss1
from .spd_solve import psd_factor


@dataclass(frozen=True)
class Estimate:
    """What the estimate pass knows about one candidate."""

    weight_error: float
    output_error: Optional[float]   # on held-out calibration rows (None: data-free)

    @property
    def price(self) -> float:
        """The error the budget is allocated by: what the user sees, where it is known."""
        return self.weight_error if self.output_error is None else self.output_error


def lowrank_spectrum(weight: Tensor, calib: Optional[Tensor] = None, blend: float = 0.0):
    """``(A, B, tails)``: ``W ~ A[:, :k] B[:, :k]^T`` is the best rank-``k`` layer for every
    ``k`` (for the output error on the fit rows when ``calib`` is given), and ``tails(k)``
    gives its ``(weight error, held-out output error)``. ``blend``: the fit rows' Gram is
    pulled that far towards the data-free objective (``factorize_blast.blend_gram``)."""
    W = weight.detach().double()
    m, n = W.shape
    if calib is None:
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        return U * s, Vh.mT, spectral_tails(s)
    st = calib_stats(calib)
    held = st.held.to(device=W.device, dtype=torch.float64)
    C = blend_gram(st.gram.to(W.device), blend)
    K = psd_factor(C, LOWRANK_RIDGE * C.diagonal().mean().clamp_min(1e-300))
    U, s, Vh = torch.linalg.svd(W @ K, full_matrices=False)
    Bm = torch.linalg.solve_triangular(K, Vh, upper=False, left=False).mT     # K^-T v_i
    A = U * s
    # W = sum_i s_i u_i b_i^T exactly, with orthonormal u_i: the residual of a truncation
    # is the tail, and its norms are weighted tail sums.
    wt = s.pow(2) * Bm.pow(2).sum(0)                                          # weight space
    Xh = held @ Bm                                                            # (N_h, k)
    ht = s.pow(2) * Xh.pow(2).sum(0)                                          # held-out rows
    w_total, h_total = float(W.pow(2).sum()), float((held @ W.mT).pow(2).sum())

    def tails(k: int):
        we = math.sqrt(max(float(wt[k:].sum()), 0.0) / w_total) if w_total > 0 else 0.0
        he = math.sqrt(max(float(ht[k:].sum()), 0.0) / h_total) if h_total > 0 else 0.0
        return we, he
    return A, Bm, tails


def spectral_tails(s: Tensor):
    """``tails(k)``: ``(weight error, None)`` of the rank-``k`` truncated SVD of a matrix with
    singular values ``s``."""
    w2 = s.double().pow(2)
    total = float(w2.sum())

    def tails(k: int):
        return math.sqrt(float(w2[k:].sum()) / total) if total > 0 else 0.0, None
    return tails


def estimate_candidates(weight: Tensor, candidates: list, *, seed: int, ss1_seed: int,
                        steps: int, calib: Optional[Tensor] = None,
                        blend: float = 0.0) -> list[Estimate]:
    """One ``Estimate`` per candidate (dense first: error 0)."""
    out: list[Optional[Estimate]] = [None] * len(candidates)
    calib = None if calib is None else calib_stats(calib)    # the Gram once, for every candidate
    by_blocks: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        if c.structure == "dense":
            out[i] = Estimate(0.0, 0.0 if calib is not None else None)
        elif c.structure == "ss1":
            f = project_ss1(weight, c.compression, ss1_seed, calib=calib)
            out[i] = Estimate(f.error, f.output_error)
        else:
            by_blocks.setdefault(tuple(c.blocks), []).append(i)
    # Data-free, the singular values alone price low rank and place BLAST's ranks between
    # its anchors: one svdvals per layer for both.
    spectrum = torch.linalg.svdvals(weight.detach().double()) \
        if calib is None and by_blocks else None
    tails = None if spectrum is None else spectral_tails(spectrum)
    for blocks, idx in by_blocks.items():
        ranks = [candidates[i].rank for i in idx]
        if tails is None and (blocks == (1, 1) or calib is not None):
            tails = lowrank_spectrum(weight, calib, blend)[2]
        if blocks == (1, 1):
            errs = [tails(r) for r in ranks]
        else:
            errs = blast_error_curve(weight, blocks, ranks, steps, calib, seed=seed,
                                     blend=blend, spectrum=spectrum)
            if calib is not None:
                # Data-aware BLAST starts from the whitened rank-r SVD (the low-rank layer at
                # the same rank) and its descent never increases the fit objective: the final
                # is at least as good as that start, whichever the short curve says.
                errs = [min(e, tails(r), key=lambda t: t[1]) for e, r in zip(errs, ranks)]
        for i, (we, oe) in zip(idx, errs):
            out[i] = Estimate(we, oe)
    return out
