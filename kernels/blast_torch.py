"""BLAST product in plain PyTorch, bmm-based: the CPU path of ``structfx::blast_linear``.

Three stages (docs/design.md, "BLAST"): ``z[j] = x[j] @ V[j]`` (one bmm over the b2 block-columns),
``w[i] = sum_j S[i, j] * z[j]`` (diagonal mixing), ``y[i] = w[i] @ U[i].T`` (one bmm over the
b1 block-rows). The dense weight is never formed. Inputs are 2-D ``(T, n)``; ``ops.py``
flattens leading dims.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def split_blocks(x2d: torch.Tensor, blocks: int, width: int) -> torch.Tensor:
    """``(T, k)`` -> ``(blocks, T, width)``: a view when ``x2d`` has unit column stride (any row
    stride); a zero-padded copy only when ``k < blocks*width``."""
    T, k = x2d.shape
    if k < blocks * width:
        x2d = F.pad(x2d, (0, blocks * width - k))
    return x2d.reshape(T, blocks, width).transpose(0, 1)


def merge_blocks(y: torch.Tensor, features: int) -> torch.Tensor:
    """``(blocks, T, width)`` -> ``(T, features)``: the inverse of ``split_blocks``."""
    blocks, T, width = y.shape
    return y.transpose(0, 1).reshape(T, blocks * width)[:, :features]


def mix(S: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``w[i] = sum_j S[i, j] * z[j]``: ``S (b1, b2, r)``, ``z (b2, T, r)`` -> ``(b1, T, r)``."""
    b1, b2, r = S.shape
    if b2 == 1:
        return S[:, 0, None, :] * z  # low rank / one block-column: a broadcast, no reduction
    # Per rank slice this is a (b1 x b2) @ (b2 x T) product; for the small b used in practice
    # a loop of b2 fused multiply-adds over contiguous (T, r) slabs beats the permutes an
    # einsum/bmm formulation needs.
    w = S[:, 0, None, :] * z[0]
    for j in range(1, b2):
        w.addcmul_(S[:, j, None, :], z[j])
    return w


def blast_forward_torch(x2d, U, S, V, bias, out_features: int) -> torch.Tensor:
    b2, q, _ = V.shape
    z = torch.bmm(split_blocks(x2d, b2, q), V)                 # (b2, T, r)
    w = mix(S, z)                                              # (b1, T, r)
    y = torch.bmm(w, U.transpose(1, 2))                        # (b1, T, p)
    y = merge_blocks(y, out_features)
    return y if bias is None else y.add_(bias)


def blast_backward_torch(dy2d, x2d, U, S, V, out_features: int, needs=(True,) * 5):
    """Gradients ``(dx, dU, dS, dV, dbias)``, each only where ``needs`` says (``None``
    otherwise); ``z`` and ``w`` are recomputed, not saved."""
    need_x, need_U, need_S, need_V, need_b = (bool(f) for f in needs)
    b1, p, _ = U.shape
    b2, q, _ = V.shape
    n = x2d.shape[1]
    xb = split_blocks(x2d, b2, q)                              # (b2, T, q)
    dyb = split_blocks(dy2d, b1, p)                            # (b1, T, p)
    dx = dU = dS = dV = dbias = None
    z = torch.bmm(xb, V) if need_U or need_S else None        # (b2, T, r)
    dw = torch.bmm(dyb, U) if need_x or need_S or need_V else None  # (b1, T, r)
    dz = mix(S.transpose(0, 1), dw) if need_x or need_V else None   # (b2, T, r)
    if need_x:
        dx = merge_blocks(torch.bmm(dz, V.transpose(1, 2)), n)  # (T, n)
    if need_U:
        dU = torch.bmm(dyb.transpose(1, 2), mix(S, z))          # (b1, p, r); w = mix(S, z)
    if need_V:
        dV = torch.bmm(xb.transpose(1, 2), dz)                  # (b2, q, r)
    if need_S:
        dS = torch.einsum("itr,jtr->ijr", dw, z)                # (b1, b2, r)
    if need_b:
        dbias = dy2d.sum(0)
    return dx, dU, dS, dV, dbias
