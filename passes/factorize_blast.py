"""Dense ``W`` -> BLAST factors ``(U, S, V)`` by preconditioned gradient descent (docs/design.md, "BLAST").

All factor updates are batched over blocks: ``W`` lives as a ``(b1, b2, p, q)`` stack, every
product is a broadcast ``matmul`` and every ``r x r`` solve one batched Cholesky solve
(``spd_solve``) on a stack. Sizes that don't divide by the block counts are zero-padded; the
returned factors have the padded shape (the layer slices).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..kernels.reference import blast_dense_weight
from ..kernels.shapes import block_pair as _pair   # shared with BlastLinear
from .calib_stats import calib_stats
from .checks import check_calib_arg, check_weight
from .spd_solve import pcg_solve, psd_factor, spd_solve

Blocks = Union[int, tuple[int, int]]

# Defaults. Measured on CPU, fp32: relative error at 50% parameters, b = 4, 512x512 ("block":
# 4x4 blocks, rank-64 diagonal and rank-8 off-diagonal ones, plus 10% noise):
#
#   steps                   0      10     15     30     100    300
#   gauss, init="svd"       0.961  0.618  0.595  0.563  0.525  0.507
#   gauss, init="random"    1.000  0.814  0.635  0.547  0.507  0.494
#   block, init="svd"       0.953  0.089  0.078  0.072  0.068  0.065
#   block, init="random"    1.000  0.258  0.142  0.084  0.074  0.070
#   (truncated SVD at the same parameter count: gauss 0.614, block 0.303)
#
# The SVD start is ahead early on everything and throughout on structured matrices; exact
# BLAST matrices are recovered from it to ~1e-7, from the random start often not at all
# (stalls at 1e-2..2e-1). On unstructured Gaussian weights, and on BLAST + 10% noise (256x256,
# r = 16: 0.164 vs 0.140 after 100 steps), the random start ends 3-15% lower after 30+
# steps. 100 steps are within ~4% of 300. ``lr``: the line-search cap in ``_descend`` makes
# any value safe; 1 -> 2 cut the 15-step error by 6-8%, larger values gained < 2% more.
DEFAULT_STEPS = 100
DEFAULT_LR = 2.0
# Convergence: stop once the relative error gains less than this per step (over 5 steps), but
# not before MIN_STEPS: from the data-aware low-rank start the descent sits on a plateau for its
# first steps (all-MiniLM-L6-v2 at b = 2: the test fired after 6 steps, exactly at the start);
# held to 30 steps it leaves it and ends 0.6-5 % lower on the held-out rows (53-106 steps).
# With the extrapolation (``accelerate``) 4e-4 stops after 53-86 steps data-free, 65-147
# data-aware, 1-4 % below where the plain descent stopped at 2e-4 (85-137 / 109-226 steps) on
# 2048x512 / 512x512 Linear-init and all-MiniLM-L6-v2 weights (b = 2..16, 50 % params), in
# 0.6-0.75 of its time; 6e-4 halves the time and still ends 0.2-3 % below.
DEFAULT_TOL = 4e-4
# Part of every cached factorization's key: bump when the descent computes different factors.
DESCENT_VERSION = 2
MIN_STEPS = 30
WHITEN_RIDGE = 1e-2
# Relative ridge of the output-aware low-rank start: above fp32 rounding of the whitened C.
LOWRANK_RIDGE = 1e-5
# An aligned SVD start (``_aligned_bases``) is dropped when its rank-1 terms cancel by more
# than this (``_cancellation``). On all-MiniLM-L6-v2's weights the aligned start often won at
# step 0 with cancellation 50-3600, ended no better after 100 steps (weight error 0.428 vs
# 0.419 for the plain start, query layer, b = 2, 50%) and left factors so ill-conditioned
# that one Adam step of 1e-4 in fine-tuning took the model's output error from 0.53 to 1.0.
# Exact random BLAST matrices (the case the aligned start is for) measure 1-3.
MAX_CANCELLATION = 30.0
# The S step's systems are solved by CG to this relative residual: the step is a preconditioned
# one anyway (damped, capped by its parabola), and 1e-4 instead of 1e-6 halves the iterations
# with the same final errors to 1e-5 (data-free and data-aware, tests/test_factorize.py).
S_STEP_RTOL = 1e-4
# Data-free, the S step's systems ``GU[i] o GV[j]`` are close to diagonal (U's and V's columns
# stay near-orthogonal from the SVD start), so two Jacobi-preconditioned CG iterations give the
# same descent as solving them to 1e-4: the same steps and final errors to 1e-4 (relative) on
# 2048x512 / 512x512 Gaussian (b = 16, 8) and all-MiniLM-L6-v2 query and FFN weights (b = 4, 8),
# at half the products. Each product streams the whole (b1, b2, r, r) stack from memory
# (35 MB at b = 16, r = 186: 4 ms on 2 cores), and they were half the step's time.
S_STEP_FREE_ITERS = 2
# Acceleration: before each sweep the factors are pushed on along the last sweep's move and the
# push is kept when it lowers f by more than this (relative to ||W||^2: the exact f of the
# pushed point is a difference of large terms, so below this it is rounding).
ACCEL_MARGIN = 1e-6
ACCEL_LAG = 3


class BlastFactors(NamedTuple):
    U: Tensor                      # (b1, p, r)
    S: Tensor                      # (b1, b2, r)
    V: Tensor                      # (b2, q, r)
    error: float                   # ||W - W_hat||_F / ||W||_F on the real (unpadded) entries
    output_error: Optional[float]  # ||X (W - W_hat)^T||_F / ||X W^T||_F on held-out calib rows


def blast_rank_for_params(out_features: int, in_features: int, blocks: Blocks,
                          params: float) -> int:
    """Rank keeping a fraction ``params`` of the dense parameters: ``floor(rho m n / (m + n + b1 b2))``."""
    b1, b2 = _pair(blocks)
    if not (isinstance(params, numbers.Real) and math.isfinite(params) and params > 0):
        raise ValueError(f"params (fraction of dense parameters) must be > 0, got {params!r}")
    m, n = out_features, in_features
    return max(1, math.floor(params * m * n / (m + n + b1 * b2)))



def _check(weight, blocks, rank, steps, calib) -> tuple[int, int]:
    check_weight("factorize_blast", weight)
    b1, b2 = _pair(blocks)
    m, n = weight.shape
    if b1 < 1 or b2 < 1:
        raise ValueError(f"factorize_blast: blocks must be >= 1, got {(b1, b2)}")
    if b1 > m or b2 > n:
        raise ValueError(f"factorize_blast: blocks {(b1, b2)} can't fit a {m}x{n} weight "
                         f"(b1 <= out_features and b2 <= in_features needed)")
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"factorize_blast: rank must be an integer >= 1, got {rank!r}")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"factorize_blast: steps must be an integer >= 0, got {steps!r}")
    if calib is not None:   # NaN / inf, or a Gram that overflows the working dtype
        check_calib_arg("factorize_blast", calib, n,
                        torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return b1, b2


# ---- the block view -------------------------------------------------------------------------

def _to_blocks(W: Tensor, b1: int, b2: int, p: int, q: int) -> Tensor:
    """``(m, n)`` -> zero-padded ``(b1, b2, p, q)`` stack of blocks."""
    m, n = W.shape
    W = torch.nn.functional.pad(W, (0, b2 * q - n, 0, b1 * p - m))
    return W.reshape(b1, p, b2, q).transpose(1, 2)


def _from_blocks(Wb: Tensor) -> Tensor:
    b1, b2, p, q = Wb.shape
    return Wb.transpose(1, 2).reshape(b1 * p, b2 * q)


def _blast_blocks(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """``W_hat[i, j] = U[i] diag(S[i, j]) V[j]^T`` as a ``(b1, b2, p, q)`` stack."""
    return (U[:, None] * S[:, :, None, :]) @ V.mT[None]


def _eye(r: int, like: Tensor) -> Tensor:
    return torch.eye(r, dtype=like.dtype, device=like.device)


# ---- initialization -------------------------------------------------------------------------

def _top_singular(A: Tensor, r: int, gen: torch.Generator) -> Tensor:
    """Top-``r`` left singular vectors of each matrix in the stack ``A (b, k, l)`` -> ``(b, k, r)``.

    When ``r`` exceeds the rank available (``min(k, l)``) the extra columns are random unit
    vectors: they still give ``S`` extra per-block freedom, and the descent moves them."""
    b, k, _ = A.shape
    # The eigenvectors of the k x k Gram A A^T (in float64: squaring the singular values must
    # not lose the small ones) are those singular vectors, several times cheaper than an SVD
    # of the wide (k, l) matrices.
    A64 = A.double()
    evals, evecs = torch.linalg.eigh(A64 @ A64.mT)
    Q = evecs.flip(-1)[..., :min(r, k, A.shape[-1])].to(A.dtype)
    if Q.shape[-1] < r:
        Q = torch.cat([Q, _unit_random(b, k, r - Q.shape[-1], A, gen)], dim=-1)
    return Q


def _least_squares_S(Wb: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """Best ``S`` for fixed ``U``, ``V``: per block ``(U^T U * V^T V) s = diag(U^T W V)``."""
    G = (U.mT @ U)[:, None] * (V.mT @ V)[None]                       # (b1, b2, r, r)
    rhs = ((U.mT[:, None] @ Wb) * V.mT[None]).sum(-1)                # (b1, b2, r)
    # A tiny ridge keeps the solve defined when the Gram is singular (r > p or r > q).
    ridge = 1e-6 * G.diagonal(dim1=-2, dim2=-1).mean().clamp_min(1e-30)
    return pcg_solve(G + ridge * _eye(G.shape[-1], G), rhs)


def _svd_bases(Wb: Tensor, r: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Top-``r`` left singular vectors of every block-row and right ones of every block-column,
    ``(b1, p, r)`` and ``(b2, q, r)``; nested across ``r`` (slice them for a smaller rank)."""
    b1, b2, p, q = Wb.shape
    Q = _top_singular(Wb.transpose(1, 2).reshape(b1, p, b2 * q), r, gen)      # block-rows
    P = _top_singular(Wb.permute(1, 3, 0, 2).reshape(b2, q, b1 * p), r, gen)  # block-columns
    return Q, P


def _svd_init(Wb: Tensor, r: int, gen: torch.Generator,
              bases: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``U[i]`` / ``V[j]`` from the top-``r`` singular vectors of block-row ``i`` / block-column
    ``j``, ``S`` by least squares.

    The singular vectors span the right subspaces but in arbitrary bases, while BLAST pairs
    column ``k`` of every ``U[i]`` with column ``k`` of every ``V[j]``: on an exact BLAST
    matrix this start has 40-90% error and the descent from it often stalls in a local
    minimum. So the bases are also aligned (``_aligned_bases``) and the start that fits
    better is kept (the aligned one wins on near-BLAST matrices, the plain one on e.g.
    block-diagonal-plus-noise ones), unless its rank-1 terms cancel (``_cancellation``).
    ``bases``: ``_svd_bases`` at this or a larger rank (shared by several ranks)."""
    Q, P = _svd_bases(Wb, r, gen) if bases is None else (bases[0][..., :r], bases[1][..., :r])
    best = None
    for k, (U, V) in enumerate([(Q, P)] + _aligned_bases(Wb, Q, P, gen)):
        S = _least_squares_S(Wb, U, V)
        err = float((_blast_blocks(U, S, V) - Wb).norm())
        if k > 0 and _cancellation(U, S, V) > MAX_CANCELLATION:
            continue
        if math.isfinite(err) and (best is None or err < best[0]):
            best = (err, U, S, V)
    return _balance(*best[1:])


def _cancellation(U: Tensor, S: Tensor, V: Tensor) -> float:
    """``|| |U| |S| |V|^T || / || U S V^T ||`` over all blocks: ~sqrt(r) when the rank-1 terms
    add up like random ones, in the hundreds when large terms cancel each other."""
    num = ((U.abs()[:, None] * S.abs()[:, :, None, :]) @ V.abs().mT[None]).norm()
    den = _blast_blocks(U, S, V).norm()
    return float(num / den) if den > 0 else math.inf


def _lowrank_init(Wb: Tensor, r: int, C: Tensor,
                  gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The output-error-optimal rank-``r`` matrix as a BLAST start: ``W ~ A B^T`` minimizing
    ``tr(R C R^T)`` (SVD of ``W K``, ``C = K K^T``), cut into blocks ``U[i] = A_i``,
    ``V[j] = B_j``, ``S = 1``. BLAST contains every rank-``r`` matrix and the descent never
    increases the objective, so the result is never worse than activation-aware low rank
    at rank ``r``."""
    b1, b2, p, q = Wb.shape
    n = b2 * q
    # Padding coordinates have zero variance, and a layer that saw fewer rows than inputs has
    # a rank-deficient C: psd_factor never fails on either.
    K = psd_factor(C, LOWRANK_RIDGE * C.diagonal().mean().clamp_min(1e-30))
    Us, s, Vh = torch.linalg.svd(_from_blocks(Wb) @ K, full_matrices=False)
    k = min(r, s.shape[0])
    A = Us[:, :k] * s[:k]                                                     # (b1 p, k)
    B = torch.linalg.solve_triangular(K, Vh[:k], upper=False, left=False).mT  # (n, k): K^-T Vh^T
    U, V = A.reshape(b1, p, k), B.reshape(b2, q, k)
    if k < r:  # more rank than the matrix has: the spare columns start at zero weight
        U = torch.cat([U, torch.zeros(b1, p, r - k, dtype=U.dtype, device=U.device)], -1)
        V = torch.cat([V, _unit_random(b2, q, r - k, U, gen)], -1)
    S = torch.ones(b1, b2, r, dtype=U.dtype, device=U.device)
    return _balance(U, S, V)


def _unit_random(b: int, k: int, r: int, like: Tensor, gen: torch.Generator) -> Tensor:
    """``(b, k, r)`` random columns of unit length, dtype and device of ``like``."""
    x = torch.randn(b, k, r, generator=gen).to(like)
    return x / x.norm(dim=1, keepdim=True)


def _aligned_bases(Wb: Tensor, Q: Tensor, P: Tensor, gen: torch.Generator) -> list:
    """``[(Q[i] A[i], P[j] B[j])]``: the SVD bases rotated so their columns pair up across blocks.

    In the SVD bases block ``(i, j)`` of an exact BLAST matrix is the ``r x r`` matrix
    ``M_ij = Q_i^T W_ij P_j = A_i D_ij B_j^T`` (``D`` diagonal). With reference blocks
    ``(rho, c)`` and a row ``i0 != rho``, ``M_i0,j (M_i0,c M_rho,c^-1 M_rho,j)^-1`` is
    ``A_i0 (diagonal) A_i0^-1`` for every ``j``, so the eigenvectors of a random mix of them
    are ``A_i0``'s columns (Jennrich-style). ``B_j`` follows from row ``i0``; then ``A_i``
    and ``B_j`` are re-fit from every block by rank-1 fits, which keeps blocks where ``D`` is
    near 0 from spoiling a factor. Empty when it doesn't apply (``r > min(p, q)``: ``M`` is
    singular) or fails numerically."""
    b1, b2, p, q = Wb.shape
    r = Q.shape[-1]
    if r > min(p, q):
        return []
    M = Q.mT[:, None] @ Wb @ P[None]                                  # (b1, b2, r, r)
    pinv = torch.linalg.pinv
    if b2 == 1:  # one block-column: each block-row is plain low rank, any B works
        A, B = M[:, 0], _eye(r, M).expand(1, r, r)
    elif b1 == 1:
        A, B = _eye(r, M).expand(1, r, r), M[0].mT
    else:
        smin = torch.linalg.svdvals(M)[..., -1]                       # (b1, b2)
        rho, c = divmod(int(smin.argmax()), b2)                       # best-conditioned refs
        i0 = int(torch.where(torch.arange(b1, device=M.device) == rho, -1, smin[:, c]).argmax())
        N = M[i0, c] @ pinv(M[rho, c]) @ M[rho]                       # A_i0 (diag) B_j^T
        w = torch.randn(b2, generator=gen).to(M)
        T = (w[:, None, None] * (M[i0] @ pinv(N))).sum(0)
        A0 = torch.linalg.eig(T).eigenvectors.real
        B = (pinv(A0) @ M[i0]).mT                                     # B_j up to column scales
        A = _column_directions(M @ pinv(B).mT[None], over=1)          # M_ij B_j^-T = A_i D_ij
        B = _column_directions((pinv(A)[:, None] @ M).mT, over=0)     # (A_i^-1 M_ij)^T = B_j D_ij
    U, V = Q @ A, P @ B
    return [(U, V)] if torch.isfinite(U).all() and torch.isfinite(V).all() else []


def _column_directions(F: Tensor, over: int) -> Tensor:
    """``F (b1, b2, r, r)`` holds, for each block, column ``k`` of a shared factor times a
    per-block scale; the shared factor's columns are the top singular directions of those
    columns collected across axis ``over`` (0: block-rows, 1: block-columns)."""
    F = F.movedim(over, -1).transpose(1, 2)                           # (b, k, r, blocks)
    return torch.linalg.svd(F, full_matrices=False).U[..., 0].mT      # (b, r, k)


def _balance(U: Tensor, S: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rescale each rank component so ``U``, ``V`` columns and ``S`` have equal typical size.

    ``W_hat`` is unchanged, but the damping ``delta`` is a fixed number added to all three
    preconditioners, whose scales trade off against each other (their product is invariant):
    balancing keeps any one of them from being swamped by ``delta``."""
    u = U.norm(dim=1).pow(2).mean(0).sqrt()                          # (r,) typical column norms
    v = V.norm(dim=1).pow(2).mean(0).sqrt()
    s = S.pow(2).mean((0, 1)).sqrt()
    g = (u * v * s).clamp_min(1e-30).pow(1 / 3)
    a, c = g / u.clamp_min(1e-30), g / v.clamp_min(1e-30)
    return U * a, S / (a * c), V * c


def _random_init(b1, b2, p, q, r, gen, like) -> tuple[Tensor, Tensor, Tensor]:
    # The authors' start: tiny U, V and S ~ N(0, 1).
    U = torch.randn(b1, p, r, generator=gen) * (1e-3 / math.sqrt(r))
    V = torch.randn(b2, q, r, generator=gen) * (1e-3 / math.sqrt(r))
    S = torch.randn(b1, b2, r, generator=gen)
    return U.to(like), S.to(like), V.to(like)


# ---- the descent ----------------------------------------------------------------------------
#
# The objective ``f = 1/2 tr(R C R^T)``, ``R = W_hat - W``, is never formed as a residual: with
# ``Y = W C`` (``W`` itself when ``C`` is the identity) every quantity a step needs is a Gram
# product. Per step the two big products are ``Y_ij V_j`` and ``Y_ij^T U_i`` (``2 m n r`` FLOPs
# each, as ``b`` GEMMs of shape ``(m, q) x (q, r)`` / ``(n, p) x (p, r)``); everything else is
# ``r x r``. With ``C`` the cross-block covariance adds ``C V`` products (``n^2 r``). The
# objective is tracked exactly through each sub-step's parabola, so the error of every step is
# known without forming ``W_hat``; the final error is recomputed from the factors.


class _Gram:
    """``Y = W C`` in the two layouts the products want, and ``C`` as a block stack."""

    def __init__(self, Wb: Tensor, C: Optional[Tensor]):
        b1, b2, p, q = Wb.shape
        Yb = Wb if C is None else _times(Wb, C)
        self.shape = (b1, b2, p, q)
        self.Yc = Yb.permute(1, 0, 2, 3).reshape(b2, b1 * p, q).contiguous()   # (b2, m, q)
        self.Yr = Yb.permute(0, 1, 3, 2).reshape(b1, b2 * q, p).contiguous()   # (b1, n, p)
        self.Cb = None if C is None else C.reshape(b2, q, b2, q).transpose(1, 2).contiguous()
        self.w2 = float((Wb * Yb).sum())                                       # ||W||_C^2

    def transposed(self) -> "_Gram":
        """The same products for ``W^T`` (data-free only: ``W^T``'s blocks are ``W``'s
        transposed, and the two layouts swap roles)."""
        if self.Cb is not None:
            raise ValueError("_Gram.transposed: only for the data-free objective")
        b1, b2, p, q = self.shape
        t = object.__new__(_Gram)
        t.shape, t.Yc, t.Yr, t.Cb, t.w2 = (b2, b1, q, p), self.Yr, self.Yc, None, self.w2
        return t

    def BU(self, V: Tensor, S: Tensor) -> Tensor:
        """``B[i] = sum_j Y_ij V_j diag(S[i, j])`` ``(b1, p, r)``, the ``U`` step's right-hand
        side. One GEMM per block-row against ``V`` scaled by ``S`` (``(b1, n, r)``) when that is
        smaller than the per-block products ``Y_ij V_j`` (``(b1, b2, p, r)``): the same FLOPs
        without the large intermediate (a 2048 x 512 layer at b = 16: 1.5M against 6M)."""
        b1, b2, p, q = self.shape
        if b1 * q > b2 * p:
            return (self.YV(V) * S[:, :, None, :]).sum(1)
        VS = (V[None] * S[:, :, None, :]).reshape(b1, b2 * q, -1)                 # (b1, n, r)
        return torch.bmm(self.Yr.mT, VS)

    def YV(self, V: Tensor) -> Tensor:
        b1, b2, p, q = self.shape
        return torch.bmm(self.Yc, V).reshape(b2, b1, p, -1).transpose(0, 1)    # (b1, b2, p, r)

    def YtU(self, U: Tensor) -> Tensor:
        b1, b2, p, q = self.shape
        return torch.bmm(self.Yr, U).reshape(b1, b2, q, -1)                     # (b1, b2, q, r)

    def CV(self, V: Tensor) -> Optional[Tensor]:
        """``CV[j, k] = C_jk V_k`` ``(b2, b2, q, r)`` (None for the identity)."""
        return None if self.Cb is None else self.Cb @ V[None]


def _objective(Wb: Tensor, U: Tensor, S: Tensor, V: Tensor, C: Optional[Tensor]) -> float:
    R = _blast_blocks(U, S, V) - Wb
    return 0.5 * float((R * _times(R, C)).sum())


def _parabola(slope: Tensor, curv: Tensor, eta: float) -> float:
    """The step along a direction: the parabola's minimum, capped at ``eta``; none along a
    direction that is flat or, from rounding, looks concave (a Gram-form curvature is a
    difference of large terms near an exact fit)."""
    if not (float(curv) > 0 and float(slope) < 0):
        return 0.0
    return min(float(-slope / curv), eta)


def _damping(delta: float, H: Tensor) -> Tensor:
    """``delta``, but at least 1e-4 of the typical curvature of each system: near an exact fit
    ``delta`` goes to 0, and gradient rounding divided by it would push factors along the
    Hessian's null directions (more rank than the matrix has) without bound."""
    return _damping_diag(delta, H.diagonal(dim1=-2, dim2=-1))[..., None]


def _damping_diag(delta: float, diag: Tensor) -> Tensor:
    """``_damping`` from the systems' diagonals ``(..., r)``, as ``(..., 1)``."""
    typical = diag.mean(-1).clamp_min(0)
    return torch.maximum(typical * 1e-4, torch.as_tensor(delta, dtype=diag.dtype))[..., None]


class _HadamardStack:
    """The data-free ``S`` step's ``b1 x b2`` systems ``GU[i] o GV[j]`` as a matrix-vector
    product: formed once when the ``(b1, b2, r, r)`` stack is small, else rebuilt per chunk of
    block-rows for every product, so the step's memory stays bounded (at b = 16 and r = 528,
    a 1024 x 2816 layer, the stack alone is 285 MB)."""

    def __init__(self, GU: Tensor, GV: Tensor, limit: int = 1 << 23):
        b1, b2, r = GU.shape[0], GV.shape[0], GU.shape[-1]
        self.GU, self.GV = GU, GV
        self.full = GU[:, None] * GV[None] if b1 * b2 * r * r <= limit else None
        self.step = max(1, limit // (b2 * r * r))
        self.diag = GU.diagonal(dim1=-2, dim2=-1)[:, None] * GV.diagonal(dim1=-2, dim2=-1)[None]

    def __call__(self, x: Tensor) -> Tensor:
        if self.full is not None:
            return (self.full @ x[..., None]).squeeze(-1)
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], self.step):
            blk = self.GU[i:i + self.step, None] * self.GV[None]
            out[i:i + self.step] = (blk @ x[i:i + self.step, ..., None]).squeeze(-1)
        return out


def _sandwich_sum(S: Tensor, G: Tensor, over: int) -> Tensor:
    """``sum_j diag(S[i, j]) G[j] diag(S[i, j])`` per block-row ``i`` (``over=1``, ``G``
    ``(b2, r, r)``), or ``sum_i diag(S[i, j]) G[i] diag(S[i, j])`` per block-column ``j``
    (``over=0``, ``G`` ``(b1, r, r)``): the ``U`` / ``V`` steps' Hessians. A loop of fused
    multiply-adds over the summed axis; ``torch.einsum`` materializes the ``(b1, b2, r, r)``
    product and was 27x slower (b = 16, r = 279, 2 CPU cores)."""
    S = S if over == 1 else S.transpose(0, 1)
    out = S.new_zeros(S.shape[0], *G.shape[-2:])
    for j in range(S.shape[1]):
        s = S[:, j]
        out.addcmul_(s[:, :, None] * G[j], s[:, None, :])
    return out


def _coupled_sandwich(S: Tensor, M: Tensor) -> Tensor:
    """``H[i] = sum_{k, j} diag(S[i, k]) M[k, j] diag(S[i, j])`` (``M`` ``(b2, b2, r, r)``): the
    data-aware ``U`` step's Hessian, by fused multiply-adds over block pairs (1.8x the einsum
    at b = 8, the same at 16)."""
    b1, b2, r = S.shape
    H = S.new_zeros(b1, r, r)
    for k in range(b2):
        sk = S[:, k, :, None]
        for j in range(b2):
            H.addcmul_(sk * M[k, j], S[:, j, None, :])
    return H


def _pair_sandwich(S: Tensor, GU: Tensor) -> Tensor:
    """``N[k, j] = sum_i diag(S[i, k]) GU[i] diag(S[i, j])`` ``(b2, b2, r, r)``: the data-aware
    ``V`` step's coupled Hessian blocks, accumulated per block-row (2-3x the einsum)."""
    b1, b2, r = S.shape
    N = S.new_zeros(b2, b2, r, r)
    for i in range(b1):
        si = S[i]
        N.addcmul_(si[:, None, :, None] * GU[i], si[None, :, None, :])
    return N


def _coupled_matvec(GU: Tensor, s: Tensor, Mp: Tensor) -> Tensor:
    """``out[i, j] = sum_k (GU[i] o M[j, k]) s[i, k]`` ``(b1, b2, r)``, the data-aware ``S`` step's
    coupled product, as one batched GEMM over ``r`` (``Mp``: ``M`` as ``(r, b2, b2 r)``; 3x the
    einsum)."""
    b1, b2, r = s.shape
    A = (GU[:, None] * s[..., None, :]).permute(2, 0, 1, 3).reshape(r, b1, b2 * r)
    return torch.bmm(A, Mp.mT).permute(1, 2, 0)


def _descend(Wb: Tensor, U: Tensor, S: Tensor, V: Tensor, steps: int, lr: float,
             C: Optional[Tensor] = None, progress: bool = False, tol: float = 0.0,
             gram: Optional[_Gram] = None, curve: Optional[list] = None,
             decay: bool = True, accelerate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``steps`` block-coordinate preconditioned steps on ``f = 1/2 tr(R C R^T)``.

    ``C = None`` is the identity (the plain Frobenius objective). Each sub-step is a quadratic
    problem in one factor, so ``f`` along the step direction ``D`` is a parabola: the step is
    the schedule's ``eta`` capped at that parabola's minimum, which makes any ``lr`` safe and
    ``f`` never increase. The damping ``delta`` uses the residual's norm ``sqrt(2 f)``.
    ``tol > 0``: stop once the relative error gained less than ``tol`` per step over the last
    5 steps (convergence; not before ``MIN_STEPS``), else run all ``steps``. ``curve``:
    receives the relative error ``sqrt(2 f) / ||W||_C`` after every step. ``decay=False``
    keeps ``eta = lr`` throughout (short runs: the linear decay to 0 only pays off over a long
    one). ``accelerate``: before each sweep, try the factors pushed on along the last sweep's
    move (Nesterov-style, restarted whenever a push is refused) and keep the push only where
    it lowers ``f``."""
    b1, b2, p, q = Wb.shape
    if C is None and b1 * q > b2 * p:
        # Data-free, the problem for W^T is the same one with U and V swapped. Solved that way
        # round, the products a step keeps per block (``Y_ij^T U_i``, ``(b1, b2, q, r)``) are
        # the smaller of the two layouts (``q < p``), and the U step's GEMM needs none.
        gt = (gram or _Gram(Wb, None)).transposed()
        V, St, U = _descend(Wb.permute(1, 0, 3, 2), V, S.transpose(0, 1), U, steps, lr, None,
                            progress, tol, gt, curve, decay, accelerate)
        return U, St.transpose(0, 1).contiguous(), V
    g = gram or _Gram(Wb, C)
    I = _eye(U.shape[-1], Wb)
    floor = 1e-7 * math.sqrt(Wb.numel())
    w_norm = math.sqrt(max(g.w2, 1e-300))
    f = _objective(Wb, U, S, V, C)
    errs = [math.sqrt(2 * max(f, 0.0)) / w_norm]
    aware = g.Cb is not None
    CV = g.CV(V)
    M = None if not aware else V[:, None].mT @ CV                     # M[k, j] = V_k^T C_kj V_j

    def u_system(S, V, M):
        """The U step's right-hand side and exact Hessian at (S, V)."""
        B = g.BU(V, S)                                                           # (b1, p, r)
        return B, (_coupled_sandwich(S, M) if aware else _sandwich_sum(S, V.mT @ V, over=1))

    prev, k = None, 0          # the iterate before the last sweep; sweeps since a restart
    bar = tqdm(range(steps), desc="BLAST factorize", disable=not progress)
    for t in bar:
        eta = lr * (1 - t / steps) if decay else lr
        system, cur = None, (U, S, V, CV)
        # (not near an exact fit, where no push could clear the margin)
        if accelerate and prev is not None and k > 0 and f > 2 * ACCEL_MARGIN * g.w2:
            # Nesterov-style extrapolation along the last sweep's move, kept only where it
            # lowers f, which the U step's own products give exactly:
            # f = 1/2 ||W||^2 - <U, B> + 1/2 <U H, U>.
            beta = k / (k + ACCEL_LAG)
            Ue, Se, Ve = (x + beta * (x - x0) for x, x0 in zip((U, S, V), prev[:3]))
            CVe = Me = None
            if aware:
                CVe = CV + beta * (CV - prev[3])
                Me = Ve[:, None].mT @ CVe
            Be, He = u_system(Se, Ve, Me)
            fe = 0.5 * g.w2 - float((Ue * Be).sum()) + 0.5 * float(((Ue @ He) * Ue).sum())
            if 0 < fe < f - ACCEL_MARGIN * g.w2:
                U, S, V, f, system, k = Ue, Se, Ve, fe, (Be, He), k + 1
                if aware:
                    CV, M = CVe, Me
            else:
                k = 0                                                    # restart
        else:
            k += 1
        prev = cur
        delta = 0.1 * math.sqrt(2 * max(f, 0.0)) + floor

        # U: the rows of every block-row i are independent; H_i is the exact Hessian.
        B, H = system or u_system(S, V, M)
        grad = U @ H - B
        dU = -spd_solve(H + _damping(delta, H) * I, grad, left=False)
        slope, curv = (grad * dU).sum(), ((dU @ H) * dU).sum()
        h = _parabola(slope, curv, eta)
        U = U + h * dU
        f += h * float(slope) + 0.5 * h * h * float(curv)

        # V: with C the block-columns are coupled; the preconditioner takes the diagonal blocks.
        YtU = g.YtU(U)                                                           # (b1, b2, q, r)
        GU = U.mT @ U
        B = (YtU * S[:, :, None, :]).sum(0)                                      # (b2, q, r)
        if aware:
            N = _pair_sandwich(S, GU)                                            # (b2, b2, r, r)
            grad = torch.einsum("jkqr,kjrs->jqs", CV, N) - B
            P = N.diagonal(dim1=0, dim2=1).permute(2, 0, 1)
        else:
            P = _sandwich_sum(S, GU, over=0)
            grad = V @ P - B
        dV = -spd_solve(P + _damping(delta, P) * I, grad, left=False)
        if aware:
            CdV = g.CV(dV)
            curv = (dV * torch.einsum("jkqr,kjrs->jqs", CdV, N)).sum()
        else:
            curv = ((dV @ P) * dV).sum()
        slope = (grad * dV).sum()
        h = _parabola(slope, curv, eta)
        V = V + h * dV
        f += h * float(slope) + 0.5 * h * h * float(curv)
        if aware:
            CV = CV + h * CdV
            M = V[:, None].mT @ CV

        # S: one r-vector per block; coupled across a block-row by C.
        rhs = (YtU * V[None]).sum(2)                                             # (b1, b2, r)
        if aware:
            # (GU_i o M_jk) s_ik summed over k, as one contraction over (k, s) per r.
            Mp = M.permute(2, 0, 1, 3).flatten(2)                                # (r, j, (k, s))
            coupled = lambda s: _coupled_matvec(GU, s, Mp)
            grad = coupled(S) - rhs
            PS = GU[:, None] * M.diagonal(dim1=0, dim2=1).permute(2, 0, 1)[None]
            dS = -pcg_solve(PS, grad, rtol=S_STEP_RTOL, shift=_damping(delta, PS)[..., 0])
            curv = (dS * coupled(dS)).sum()
        else:
            PS = _HadamardStack(GU, V.mT @ V)
            grad = PS(S) - rhs
            shift = _damping_diag(delta, PS.diag)
            dS = -pcg_solve(PS, grad, rtol=S_STEP_RTOL, shift=shift, diag=PS.diag,
                            max_iter=S_STEP_FREE_ITERS)
            # CG from 0 leaves its residual orthogonal to its iterate, so d^T (A + shift) d
            # = -d^T grad (to fp32 rounding, measured): the curvature without a product.
            curv = -(grad * dS).sum() - (shift * dS.pow(2)).sum()
        slope = (grad * dS).sum()
        h = _parabola(slope, curv, eta)
        S = S + h * dS
        f += h * float(slope) + 0.5 * h * h * float(curv)

        errs.append(math.sqrt(2 * max(f, 0.0)) / w_norm)
        if progress:
            bar.set_postfix(rel_err=f"{errs[-1]:.4f}")
        if tol > 0 and t + 1 >= MIN_STEPS and errs[-6] - errs[-1] < 5 * tol * errs[-1]:
            break
    if curve is not None:
        curve.extend(errs[1:])
    return U, S, V


def _times(Rb: Tensor, C: Optional[Tensor]) -> Tensor:
    """``R @ C`` for a block stack ``R`` (``C = None``: the identity)."""
    return Rb if C is None else _to_blocks(_from_blocks(Rb) @ C, *Rb.shape)


def _unit_columns(U: Tensor, S: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit-norm columns of every ``U[i]``, ``V[j]``, norms folded into ``S`` (``W_hat`` kept)."""
    nu, nv = U.norm(dim=1), V.norm(dim=1)                            # (b1, r), (b2, r)
    nu, nv = torch.where(nu > 0, nu, 1), torch.where(nv > 0, nv, 1)  # all-padding blocks are 0
    return U / nu[:, None], S * nu[:, None] * nv[None], V / nv[:, None]


# ---- public entry points --------------------------------------------------------------------

class _Problem(NamedTuple):
    """A weight in the coordinates the descent works in (blocks, whitened, RMS 1)."""

    W: Tensor                 # (m, n) in the working dtype
    Wb: Tensor                # (b1, b2, p, q): padded blocks, whitened (data-aware), / scale
    scale: Tensor
    C: Optional[Tensor]       # whitened input covariance (None: data-free)
    L: Optional[Tensor]       # per-block whitening factors (b2, q, q)
    held: Optional[Tensor]    # held-out calibration rows


def _prepare(weight: Tensor, b1: int, b2: int, calib: Optional[Tensor],
             blend: float = 0.0) -> _Problem:
    m, n = weight.shape
    p, q = -(-m // b1), -(-n // b2)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype)
    Wb = _to_blocks(W, b1, b2, p, q)
    # Data-aware: work in coordinates where each input block is white (W[:, j] @ L[j]), so the
    # block-diagonal preconditioners are exact for the diagonal blocks of C, and keep the
    # cross-block covariance in the objective (R replaced by R C). Measured held-out output
    # error (128x192, b = 4, 50% params, 40 steps) on inputs anisotropic in random
    # directions: whitening alone 0.37, R C without whitening 0.16 (its preconditioners
    # don't see C; 100 steps to match), both 0.12, data-free 0.53. With per-channel scales
    # only (C ~ diagonal), whitening alone is as good (0.144 vs 0.149).
    C = L = held = None
    if calib is not None:
        st = calib_stats(calib)
        held = st.held.to(device=W.device, dtype=dtype)
        C, L = _whitening(st.cov(dtype, W.device), b2, q, blend)
        Wb = Wb @ L[None]
        C = _whitened_cov(C, L)
    # Work on W / RMS (folded back into S): damping and step sizes are then independent of the
    # weight's scale (the RMS is > 0 for any nonzero matrix).
    scale = Wb.norm() / math.sqrt(m * n)
    scale = scale if scale > 0 else Wb.new_tensor(1.0)
    return _Problem(W, Wb / scale, scale, C, L, held)


def _start(prob: _Problem, rank: int, init: str, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if init == "svd" and prob.C is not None:
        return _lowrank_init(prob.Wb, rank, prob.C, gen)
    if init == "svd":
        return _svd_init(prob.Wb, rank, gen)
    b1, b2, p, q = prob.Wb.shape
    return _random_init(b1, b2, p, q, rank, gen, prob.Wb)


def _finish(prob: _Problem, U: Tensor, S: Tensor, V: Tensor, weight: Tensor) -> BlastFactors:
    """Back to the weight's coordinates; exact errors from the factors."""
    m, n = prob.W.shape
    if prob.L is not None:
        V = torch.linalg.solve_triangular(prob.L.mT, V, upper=True)  # back from white coords
    U, S, V = _unit_columns(U, S * prob.scale, V)
    W_hat = blast_dense_weight(U, S, V, m, n)
    error = relative_error(prob.W - W_hat, prob.W)
    out_err = None if prob.held is None else output_error(prob.held, prob.W, W_hat)
    out = lambda t: t.to(device=weight.device, dtype=torch.float32).contiguous()
    return BlastFactors(out(U), out(S), out(V), error, out_err)


def factorize_blast(weight: Tensor, blocks: Blocks, rank: int, steps: int = DEFAULT_STEPS,
                    calib: Optional[Tensor] = None, *, init: str = "svd", lr: float = DEFAULT_LR,
                    seed: int = 0, progress: bool = False, tol: float = 0.0,
                    blend: float = 0.0) -> BlastFactors:
    """Factorize ``weight`` ``(m, n)`` into BLAST factors with ``blocks`` ``b`` or ``(b1, b2)``.

    Up to ``steps`` iterations of preconditioned descent, step size decaying linearly from
    ``lr`` to 0, from an SVD start (``init="svd"``) or the authors' tiny random one
    (``"random"``, drawn from ``seed``); ``tol > 0`` stops early once the relative error
    gains less than ``tol`` per step. ``calib`` ``(..., n)``: inputs seen by the layer (or
    their ``calib_stats.CalibStats``); the objective becomes the output error on them, with
    every ``calib_stats.HOLDOUT_EVERY``-th row held out to report ``output_error``; ``blend``:
    how much of the data-free objective to keep (``blend_gram``). Factors come back in fp32 on
    ``weight``'s device, with the padded shapes ``(b1, p, r)``, ``(b1, b2, r)``, ``(b2, q, r)``
    and unit-norm columns in ``U``, ``V``.
    """
    b1, b2 = _check(weight, blocks, rank, steps, calib)
    if init not in ("svd", "random"):
        raise ValueError(f"factorize_blast: init must be 'svd' or 'random', got {init!r}")
    prob = _prepare(weight, b1, b2, calib, blend)
    U, S, V = _start(prob, rank, init, seed)
    U, S, V = _descend(prob.Wb, U, S, V, steps, lr, prob.C, progress, tol=tol)
    return _finish(prob, U, S, V, weight)


def blast_error_curve(weight: Tensor, blocks: Blocks, ranks: list[int], steps: int,
                      calib: Optional[Tensor] = None, *, refine_steps: int = 3,
                      lr: float = DEFAULT_LR, seed: int = 0, blend: float = 0.0,
                      spectrum: Optional[Tensor] = None) -> list[tuple[float, Optional[float]]]:
    """Estimated ``(weight error, held-out output error)`` of BLAST at every rank in
    ``ranks``: what ``factorize_blast`` run to convergence would reach, at a fraction of its
    cost.

    Data-free: at two anchor ranks (``anchor_ranks``: the largest and the one nearest 2/3 of
    it), ``steps`` constant-size steps from the SVD start (the block-row and block-column
    eigenvectors are shared: nested across ranks), extrapolated along the descent's
    power-law tail (``extrapolate_tail``); the other ranks are read off the weight's singular
    values ``spectrum`` (computed when not given) through the anchors (``interpolate_ranks``).
    Data-aware (``calib``): ONE
    factorization at the largest rank, ``steps`` steps of the block-whitened descent, cut to
    each smaller rank by keeping the rank-1-across-blocks terms of most energy, then
    ``refine_steps`` steps at that rank; an upper bound (the aware descent's long plateau
    can't be extrapolated), which ``estimate`` caps by the low-rank error at the same rank.
    ``bench compress`` measures how close either is to the finals."""
    b1, b2 = _check(weight, blocks, max(ranks), steps, calib)
    prob = _prepare(weight, b1, b2, calib, blend)
    gram = _Gram(prob.Wb, None)
    out = {}
    if calib is None:
        want = sorted(set(ranks))
        anchors = anchor_ranks(want)
        bases = _svd_bases(prob.Wb, max(anchors), torch.Generator().manual_seed(seed))

        def run(r: int) -> None:
            U, S, V = _svd_init(prob.Wb, r, torch.Generator().manual_seed(seed), bases)
            curve: list = []
            U, S, V = _descend(prob.Wb, U, S, V, steps, lr, None, gram=gram, curve=curve,
                               decay=False)
            f = _finish(prob, U, S, V, weight)
            out[r] = (extrapolate_tail(f.error, curve), None)
        for r in anchors:
            run(r)
        if len(anchors) < len(want):
            sv = torch.linalg.svdvals(prob.W.double()) if spectrum is None else spectrum
            between = interpolate_ranks(sv, {r: out[r][0] for r in anchors},
                                        [r for r in want if r not in out])
            if between is None:               # the anchors can't place the others: run them
                for r in want:
                    if r not in out:
                        run(r)
            else:
                out.update((r, (e, None)) for r, e in between.items())
        return [out[r] for r in ranks]
    top = max(ranks)
    U, S, V = _start(prob, top, "svd", seed)
    # The curve descends in the block-whitened coordinates without the cross-block covariance
    # (the data-free cost: the coupled terms cost b^2 more per step); the errors reported are
    # still exact, from the factors, on the held-out rows.
    U, S, V = _descend(prob.Wb, U, S, V, steps, lr, None, gram=gram)
    # Energy of each term over all blocks (cross terms ignored): |u_ik|^2 s_ijk^2 |v_jk|^2.
    energy = (U.pow(2).sum(1)[:, None] * S.pow(2) * V.pow(2).sum(1)[None]).sum((0, 1))
    order = energy.argsort(descending=True)
    for r in sorted(set(ranks), reverse=True):
        keep = order[:r]
        u, s, v = U[..., keep], S[..., keep], V[..., keep]
        if r < top and refine_steps:
            u, s, v = _descend(prob.Wb, u, s, v, refine_steps, lr, None, gram=gram)
        f = _finish(prob, u, s, v, weight)
        out[r] = (f.error, f.output_error)
    return [out[r] for r in ranks]


# Data-free, BLAST at b blocks and rank r errs like the truncated SVD at an effective rank
# g r (g = 1 at b = 1; more blocks, more per-block freedom: g = 1.0-2.0 measured), and g
# grows slowly and smoothly with r. So from two anchor ranks (the grid's largest and the one
# nearest 2/3 of it) the others follow with g linear in r: against every rank estimated on
# its own, within 3.7 % (worst of 16: 2048x512 and 512x512 Linear-init, all-MiniLM-L6-v2
# query and FFN, b = 2..16, rank fractions 0.125-0.75 of the params), at 1.25 of the top
# rank's cost instead of 3.5 (the six-rank default grid).
ANCHOR_AT = 2 / 3


def anchor_ranks(ranks: list[int]) -> list[int]:
    """The ranks ``blast_error_curve`` factorizes (data-free): the largest, and the one
    nearest ``ANCHOR_AT`` of it; all of them when there are two or fewer."""
    want = sorted(set(ranks))
    if len(want) <= 2:
        return want
    top = want[-1]
    low = min(want[:-1], key=lambda r: (abs(r - ANCHOR_AT * top), r))
    return [low, top]


def interpolate_ranks(spectrum: Tensor, anchors: dict, ranks: list[int]) -> Optional[dict]:
    """``{rank: error}`` for ``ranks`` from the errors at two ``anchors`` ``{rank: error}``:
    the truncated-SVD error (from the singular values ``spectrum``) at ``g(r) r``, ``g``
    linear through the anchors' effective ranks, kept between the anchors' errors (and at
    most 1 below the lower one). None when the anchors can't define ``g`` (an error of 0 or
    >= 1, or not falling with the rank)."""
    (r0, e0), (r1, e1) = sorted(anchors.items())
    e2 = spectrum.double().pow(2)
    total = float(e2.sum())
    if not (total > 0 and 0 < e1 < e0 < 1 and r0 < r1):
        return None
    kept = torch.cat([e2.new_zeros(1), e2.cumsum(0) / total])        # energy of the top k

    def error_at(k: float) -> float:                                 # continuous k
        k = min(max(k, 0.0), float(len(e2)))
        i = min(int(k), len(e2) - 1)
        return math.sqrt(max(1.0 - float(kept[i] + (k - i) * (kept[i + 1] - kept[i])), 0.0))

    def rank_of(e: float) -> float:                                  # error_at^-1
        want = 1.0 - e * e
        i = int(torch.searchsorted(kept, torch.tensor(want, dtype=kept.dtype)))
        if i <= 0 or i >= len(kept):
            return math.nan
        lo, hi = float(kept[i - 1]), float(kept[i])
        return (i - 1) + (want - lo) / (hi - lo) if hi > lo else float(i)

    g0, g1 = rank_of(e0) / r0, rank_of(e1) / r1
    if not (math.isfinite(g0) and math.isfinite(g1)):
        return None
    out = {}
    for r in ranks:
        g = g0 + (g1 - g0) * (r - r0) / (r1 - r0)
        e = error_at(g * r)
        out[r] = min(max(e, e1), e0) if r > r0 else min(max(e, e0), 1.0)
    return out


# The data-free descent from the SVD start has a power-law tail, e(t) ~ e_inf + A t^-0.7
# (2048x512 Gaussian b = 16, 512^2 Gaussian b = 4, all-MiniLM-L6-v2 query b = 4 and FFN b = 4:
# the gain per doubling of the steps shrinks by ~0.62 from step 15 on). So from the errors
# after 2s/3 and s steps, e(T) = e(s) - k (e(2s/3) - e(s)), k = (s^-a - T^-a) / ((2s/3)^-a -
# s^-a), T where the converged factorization stops: 100-160 steps for the plain descent,
# 53-86 accelerated (DEFAULT_TOL), hence T = 60 (k = 1.66 for s = 10; the k that would hit
# each final exactly measured 0.8-1.8 at s = 10, higher the more rank). Against the finals,
# 10 steps extrapolated: -3.7 % .. +5.1 % (mean -0.9 %) on 2048x512 and 512x512 Linear-init
# and MiniLM query / FFN weights at b = 4, 16 and 25 / 50 / 75 % of the params (the 25 % ranks
# read off the anchors); the raw 10-step errors are 1-72 % above the finals.
TAIL_ALPHA = 0.7
TAIL_STEPS = 60
TAIL_MIN_STEPS = 8      # 9-15 steps: within 3 % on those four; 6 steps: 6-14 % low


def extrapolate_tail(error: float, curve: list) -> float:
    """``error`` (after ``len(curve)`` constant-size steps, ``curve`` the relative error after
    each) extrapolated to convergence along the power-law tail; ``error`` itself when the
    curve is too short (or long) to say: from fewer than ``TAIL_MIN_STEPS`` the start's
    transient dominates (6 steps extrapolated 6-14 % below the converged error). Never below
    half of ``error``."""
    s = len(curve)
    if s < TAIL_MIN_STEPS or s >= TAIL_STEPS:
        return error
    a, t = TAIL_ALPHA, (2 * s) // 3
    k = (s ** -a - TAIL_STEPS ** -a) / (t ** -a - s ** -a)
    gain = max(curve[t - 1] - curve[-1], 0.0)
    return max(error - k * gain, 0.5 * error)


def blend_gram(C: Tensor, blend: float) -> Tensor:
    """``(1 - blend) C + blend mean(diag C) I``: the calibration Gram ``C`` pulled towards the
    data-free objective (whose Gram is a multiple of the identity), at ``C``'s own scale.
    ``blend = 0`` is ``C`` itself, ``1`` the weight-space fit."""
    if not blend:
        return C
    scale = C.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return (1 - blend) * C + blend * scale * torch.eye(C.shape[-1], dtype=C.dtype,
                                                        device=C.device)


def _whitening(C: Tensor, b2: int, q: int, blend: float = 0.0) -> tuple[Tensor, Tensor]:
    """The fit rows' covariance ``C`` ``(n, n)`` (blended, padded to ``b2 q``) and the Cholesky
    factors ``L[j]`` of its diagonal blocks. The relative ridge covers rank-deficient blocks
    (few rows, padding coordinates); 1e-4..1e-1 gave the same held-out error within 2%."""
    n = C.shape[0]
    C = blend_gram(C, blend)        # the padding coordinates stay at zero variance
    C = torch.nn.functional.pad(C, (0, b2 * q - n, 0, b2 * q - n))
    Cjj = C.reshape(b2, q, b2, q).diagonal(dim1=0, dim2=2).permute(2, 0, 1)      # (b2, q, q)
    lam = WHITEN_RIDGE * Cjj.diagonal(dim1=-2, dim2=-1).mean().clamp_min(1e-30)
    return C, psd_factor(Cjj, lam)


def _whitened_cov(C: Tensor, L: Tensor) -> Tensor:
    """``blockdiag(L)^-1 C blockdiag(L)^-T``: ~identity diagonal blocks, cross-block terms kept."""
    b2, q, _ = L.shape
    Cb = C.reshape(b2, q, b2, q).transpose(1, 2)                                   # (b2, b2, q, q)
    Cb = torch.linalg.solve_triangular(L[:, None], Cb, upper=False)
    Cb = torch.linalg.solve_triangular(L.mT[None], Cb, upper=True, left=False)
    return Cb.transpose(1, 2).reshape(b2 * q, b2 * q)


def relative_error(diff: Tensor, ref: Tensor) -> float:
    """``||diff||_F / ||ref||_F`` (0 when both are 0)."""
    num, den = float(diff.norm()), float(ref.norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def output_error(X: Tensor, W: Tensor, W_hat: Tensor) -> float:
    """``||X (W - W_hat)^T||_F / ||X W^T||_F``: the relative output error of a layer (weights in
    nn.Linear layout) on input rows ``X``. The one definition every pass reports."""
    return relative_error(X @ (W - W_hat).mT, X @ W.mT)
