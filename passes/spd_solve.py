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

from typing import Optional

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
    if B.shape[-1] >= A.shape[-1]:
        # As many right-hand sides as unknowns or more: A^-1 from the factor, then one GEMM.
        # LAPACK's triangular solves run at a fraction of GEMM speed: 1.2-1.7x faster for
        # (4, 126, 126) x 128 .. (4, 203, 203) x 512 stacks on 2 cores, same error (2.5e-7
        # relative, fp32); with fewer right-hand sides the solves win (16 x 186 x 32: 1.8x).
        X = torch.cholesky_inverse(L) @ B
    else:
        X = torch.cholesky_solve(B, L)
    bad = (info != 0).nonzero()
    for idx in bad.tolist():                       # rare: solve those one by one, by LU
        X[tuple(idx)] = torch.linalg.solve(A[tuple(idx)], B[tuple(idx)])
    if vector:
        return X.squeeze(-1)
    return X if left else X.mT


def psd_factor(A: Tensor, ridge) -> Tensor:
    """Lower-triangular ``K`` with ``K K^T = A + ridge I`` for symmetric positive
    *semi*-definite ``A`` ``(..., n, n)`` (a Gram or covariance matrix), in ``A``'s dtype.

    Never fails on a rank-deficient ``A`` (fewer rows than inputs, a CLS-only layer): the
    factorization runs in float64, where the rounding of an fp32 Gram can't outweigh the
    ridge; a batch element that is still rejected (``A`` had negative eigenvalues larger than
    ``ridge``, from rounding in how it was formed) has its eigenvalues clipped at ``ridge``."""
    A64 = A.double()
    n = A.shape[-1]
    eye = torch.eye(n, dtype=torch.float64, device=A.device)
    ridge = torch.as_tensor(ridge, dtype=torch.float64, device=A.device)
    ridge = ridge.clamp_min(1e-300).reshape(ridge.shape + (1, 1))
    K, info = torch.linalg.cholesky_ex(A64 + ridge * eye)
    for idx in (info != 0).nonzero().tolist():
        i = tuple(idx)
        e, Q = torch.linalg.eigh(A64[i])
        lam = ridge.expand(*A.shape[:-2], 1, 1)[i]
        clipped = (Q * (e.clamp_min(0) + lam.reshape(()))) @ Q.mT
        K[i] = torch.linalg.cholesky(0.5 * (clipped + clipped.mT))
    return K.to(A.dtype)


def pcg_solve(A, b: Tensor, *, rtol: float = 1e-6, max_iter: int = 64,
              shift: Optional[Tensor] = None, diag: Optional[Tensor] = None) -> Tensor:
    """``x`` with ``(A + shift I) x = b`` for a stack of symmetric positive definite ``A``
    ``(..., n, n)`` and vectors ``b`` ``(..., n)``, by conjugate gradients with a diagonal
    (Jacobi) preconditioner, all systems at once. ``shift``: a scalar or ``(..., 1)`` (one
    per system; the damping), applied without forming ``A + shift I``: for the ``S`` step's
    ``b1 b2 r^2`` stack that copy cost as much as the solve. ``A`` may also be a function
    computing ``A x`` for ``x`` ``(..., n)``, with its diagonal given as ``diag``.

    For the many small, well-conditioned systems of the BLAST ``S`` step (one ``r x r``
    Hadamard-product Gram per block, ``b1 b2`` of them) this is several times faster than a
    batched Cholesky, which LAPACK runs matrix by matrix: each iteration is one batched
    matrix-vector product. Stops when every system's residual is below ``rtol`` of its
    right-hand side, or after ``max_iter`` iterations; every iterate from ``x = 0`` lowers
    ``1/2 x^T A x - b^T x``, so an early stop is still a descent direction for it."""
    if callable(A):
        if diag is None:
            raise ValueError("pcg_solve: a matrix-vector function needs diag=")
        matvec = A
    else:
        diag = A.diagonal(dim1=-2, dim2=-1)
        matvec = lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)
    tiny = torch.finfo(b.dtype).tiny
    sh = None if shift is None else torch.as_tensor(shift, dtype=b.dtype, device=b.device)
    dinv = 1.0 / (diag if sh is None else diag + sh).clamp_min(tiny)
    x = torch.zeros_like(b)
    r = b.clone()
    z = r * dinv
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    stop = (rtol * b.norm(dim=-1)).pow(2)
    for it in range(min(max_iter, b.shape[-1])):
        Ap = matvec(p)
        if sh is not None:
            Ap = Ap + sh * p
        alpha = rz / (p * Ap).sum(-1, keepdim=True).clamp_min(tiny)
        x = x + alpha * p
        r = r - alpha * Ap
        if it % 4 == 3 and bool((r.pow(2).sum(-1) <= stop).all()):
            break
        z = r * dinv
        rz_new = (r * z).sum(-1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(tiny)) * p
        rz = rz_new
    return x
