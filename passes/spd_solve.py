"""Batched solves with symmetric positive definite matrices (the Gram systems of the
factorizations), by Cholesky.

Why not ``torch.linalg.solve``: on CPU builds with MKL, a *batched* LU factorization of
matrices larger than about 150 x 150 hangs when torch uses more than one thread (MKL prints
"Parameter 6 was incorrect on entry to SLASWP" and never returns; seen with torch 2.13 on 2
cores, float32 and float64). Every system the factorizations solve is a Gram matrix plus a
positive ridge, so Cholesky is the right tool anyway; a batch element that Cholesky rejects
(not positive definite in floating point) is solved on its own by LU, which is safe unbatched.
"""
from __future__ import annotations

import torch
from torch import Tensor


def spd_solve(A: Tensor, B: Tensor, *, left: bool = True) -> Tensor:
    """``X`` with ``A X = B`` (``left``) or ``X A = B`` (``left=False``), ``A`` symmetric
    positive definite of shape ``(..., n, n)``. ``B``: ``(..., n, k)`` / ``(..., k, n)``, or
    vectors as ``torch.linalg.solve`` reads them (``B.shape == A.shape[:-1]``)."""
    vector = B.ndim == 1 or (B.ndim == A.ndim - 1 and B.shape == A.shape[:-1])
    if vector:
        B = B.unsqueeze(-1)
    elif not left:
        B = B.mT                                   # X A = B  <=>  A X^T = B^T (A symmetric)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    A = A.expand(*batch, *A.shape[-2:])
    B = B.expand(*batch, *B.shape[-2:])
    L, info = torch.linalg.cholesky_ex(A)
    X = torch.cholesky_solve(B, L)
    bad = (info != 0).nonzero()
    for idx in bad.tolist():                       # rare: solve those one by one, by LU
        X[tuple(idx)] = torch.linalg.solve(A[tuple(idx)], B[tuple(idx)])
    if vector:
        return X.squeeze(-1)
    return X if left else X.mT
