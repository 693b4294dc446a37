"""Dense ``W`` -> SS1 parameters ``P`` (docs/design.md, "SS1"), with or without calibration data.

Data-free, the least-squares ``P`` is the mean of the dense entries tied to each parameter.
With calibration inputs ``X``, each column block ``j`` solves a ridge least-squares problem on
the sketched inputs ``sketch_j(X)`` so that the layer's *outputs* match, batched over blocks.
Every index comes from ``kernels/ss1_hash.py``, so the projection reads ``P`` exactly like the
layer does.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..kernels import ss1_hash
from .calib_stats import calib_stats
from .checks import check_calib_arg, check_weight
from .factorize_blast import relative_error
from .spd_solve import spd_solve

# Relative to the mean diagonal of each block's Gram. Measured held-out output error (96x160,
# c = 2) with 3584 / 350 / 88 training rows: per-channel input scales 0.300 / 0.313 / 0.484
# (1e-2: 0.300 / 0.307 / 0.386), inputs anisotropic in random directions 0.049 / 0.058 /
# 0.108 (1e-2: 0.070 / 0.079 / 0.125); data-free 0.60 / 0.63.
DEFAULT_RIDGE = 1e-3
# Upper bound on the elements gathered from C at once (memory cap for wide layers).
_CHUNK_ELEMENTS = 1 << 26


class SS1Factors(NamedTuple):
    P: Tensor                      # (N, K_red), N = out_features
    error: float                   # ||W - W_hat||_F / ||W||_F
    output_error: Optional[float]  # ||X (W - W_hat)^T||_F / ||X W^T||_F on held-out calib rows


def ss1_compression_for_params(params: float) -> int:
    """Compression keeping a fraction ``params`` of the dense parameters: ``round(1 / rho)``."""
    if not (isinstance(params, numbers.Real) and math.isfinite(params) and params > 0):
        raise ValueError(f"params (fraction of dense parameters) must be > 0, got {params!r}")
    return max(1, round(1 / params))


def _check(weight, compression, calib, block_k, block_n, ridge):
    check_weight("project_ss1", weight)
    N, K = weight.shape
    if isinstance(compression, numbers.Integral) and not isinstance(compression, bool):
        compression = int(compression)  # numpy ints are fine; floats / bools are not
    ss1_hash.check_config(K, N, compression, block_k, block_n)
    if not (isinstance(ridge, numbers.Real) and ridge > 0):
        raise ValueError(f"project_ss1: ridge must be > 0, got {ridge!r}")
    if calib is not None:
        # Finite is all it takes: the rows are rescaled before the Gram is formed.
        check_calib_arg("project_ss1", calib, K, gram_dtype=None)
    return compression


def _mean_projection(W: Tensor, idx: Tensor, numel: int) -> Tensor:
    """Flat ``P``: each entry the mean of the ``W`` entries that read it (0 if none do)."""
    flat = idx.reshape(-1)
    total = W.new_zeros(numel).scatter_add_(0, flat, W.reshape(-1))
    count = W.new_zeros(numel).scatter_add_(0, flat, torch.ones_like(W).reshape(-1))
    return torch.where(count > 0, total / count.clamp_min(1), 0)


def _data_aware(W: Tensor, P0: Tensor, C: Tensor, sidx: Tensor, block_n: int,
                ridge: float) -> Tensor:
    """Per column block ``j``: ``min ||X W_j - Xs_j P_j^T||^2 + lam ||P_j - P0_j||^2``, from the
    fit rows' Gram ``C = X^T X``.

    ``Xs_j = X_pad S_j`` (``S_j`` sums the ``c`` rotated chunks), so the normal equations
    need only ``C = X^T X``: ``G_j = S_j^T C S_j``, right-hand side ``S_j^T C W_j``. Both are
    gathers from ``C``, whose size doesn't grow with the number of calibration rows. The
    ridge pulls towards the data-free ``P0`` rather than towards 0, so directions the
    calibration rows never excite keep the weight-space optimum instead of being zeroed."""
    K, N = W.shape
    n_blocks, c, K_red = sidx.shape
    C = torch.nn.functional.pad(C, (0, 1, 0, 1))                   # column K: padding, reads 0
    Wp = torch.nn.functional.pad(W, (0, n_blocks * block_n - N, 0, 1))
    CW = (C @ Wp).reshape(K + 1, n_blocks, block_n).transpose(0, 1)  # (n_blocks, K+1, BN)
    P0b = torch.nn.functional.pad(P0, (0, 0, 0, n_blocks * block_n - N))
    P0b = P0b.reshape(n_blocks, block_n, K_red).mT                   # (n_blocks, K_red, BN)
    eye = torch.eye(K_red, dtype=W.dtype, device=W.device)

    # Batched over column blocks, in chunks that bound the gathered (blocks, c K_red, K+1) rows.
    step = max(1, _CHUNK_ELEMENTS // (c * K_red * (K + 1)))
    out = []
    for j0 in range(0, n_blocks, step):
        J = sidx[j0:j0 + step].reshape(-1, c * K_red)                 # (nJ, c K_red)
        nJ = J.shape[0]
        rows = C[J].reshape(nJ, c, K_red, K + 1).sum(1)                # S_j^T C
        G = rows.gather(2, J[:, None, :].expand(nJ, K_red, c * K_red))
        G = G.reshape(nJ, K_red, c, K_red).sum(2)                      # S_j^T C S_j
        rhs = CW[j0:j0 + nJ].gather(1, J[:, :, None].expand(nJ, c * K_red, block_n))
        rhs = rhs.reshape(nJ, c, K_red, block_n).sum(1)                # S_j^T C W_j
        lam = ridge * G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
        out.append(spd_solve(G + lam * eye, rhs + lam * P0b[j0:j0 + nJ]))
    # Parameters that only padding reads have a zero row and column in G, so the ridge keeps
    # them at P0's 0; the padded output columns have a zero target and P0, so they are 0 too.
    return torch.cat(out).mT.reshape(n_blocks * block_n, K_red)[:N]


def project_ss1(weight: Tensor, compression: int, seed: int = 0, calib: Optional[Tensor] = None,
                *, block_k: int = ss1_hash.DEFAULT_BLOCK_K,
                block_n: int = ss1_hash.DEFAULT_BLOCK_N, ridge: float = DEFAULT_RIDGE) -> SS1Factors:
    """Project ``weight`` ``(N, K)`` (nn.Linear layout) onto SS1 with compression ``c``.

    Without ``calib``: the weight-space least-squares ``P``. With ``calib`` ``(..., K)``: the
    output-space least squares on 7/8 of the rows (relative ridge ``ridge``, towards the
    data-free ``P``); the rest are held out to report ``output_error``."""
    compression = _check(weight, compression, calib, block_k, block_n, ridge)
    N, K = weight.shape
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).t()                                  # (K, N), spec layout
    K_red = ss1_hash.reduced_k(K, compression, block_k)
    idx = ss1_hash.weight_index(K, N, compression, seed, block_k, block_n).to(W.device)

    P = _mean_projection(W, idx, N * K_red).reshape(N, K_red)
    output_error = None
    if calib is not None:
        st = calib_stats(calib)
        # The solution and the errors are invariant to the inputs' scale (the ridge is
        # relative): normalize so that X^T X can't overflow (activations of 1e20 are finite).
        scale = max(st.max_abs, 1e-300)
        C = (st.gram.to(W.device) / scale ** 2).to(dtype)
        held = (st.held.to(device=W.device, dtype=torch.float64) / scale).to(dtype)
        sidx = ss1_hash.sketch_index(K, N, compression, seed, block_k, block_n).to(W.device)
        P = _data_aware(W, P, C, sidx, block_n, ridge)
        W_hat = P.reshape(-1)[idx]
        output_error = relative_error(held @ (W - W_hat), held @ W)

    error = relative_error(W - P.reshape(-1)[idx], W)
    return SS1Factors(P.to(device=weight.device, dtype=torch.float32), error, output_error)
