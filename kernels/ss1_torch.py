"""SS1 product in plain PyTorch: the CPU path of ``structfx::ss1_linear``.

Sketch, then a smaller GEMM (docs/design.md, "SS1"): one precomputed index tensor gathers, for every
column block ``j``, the ``c`` rotated chunks of ``x`` that share a parameter row; they are
summed (the sketch, ``K -> K_red``) and one batched GEMM over column blocks multiplies by ``P``.
Column blocks are processed in groups so the sketched input stays under ``_MAX_SKETCH`` elements.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ss1_hash

_MAX_SKETCH = 1 << 24


def _groups(T: int, n_blocks: int, K_red: int):
    per = max(1, min(n_blocks, _MAX_SKETCH // max(1, T * K_red)))
    return [(g, min(g + per, n_blocks)) for g in range(0, n_blocks, per)]


def _sketch(x_pad: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``(T, K+1)`` and ``(g, c, K_red)`` -> ``(g, T, K_red)``: sum of the c rotated chunks."""
    g, c, K_red = idx.shape
    T = x_pad.shape[0]
    xs = torch.index_select(x_pad, 1, idx[:, 0].reshape(-1))
    for u in range(1, c):
        xs.add_(torch.index_select(x_pad, 1, idx[:, u].reshape(-1)))
    return xs.view(T, g, K_red).transpose(0, 1)


def _padded_P(P: torch.Tensor, block_n: int) -> torch.Tensor:
    N, K_red = P.shape
    n_blocks = -(-N // block_n)
    if N < n_blocks * block_n:
        P = F.pad(P, (0, 0, 0, n_blocks * block_n - N))
    return P.view(n_blocks, block_n, K_red)


def ss1_forward_torch(x2d, P, bias, compression: int, seed: int, block_k: int, block_n: int):
    T, K = x2d.shape
    N, K_red = P.shape
    idx = ss1_hash.sketch_index(K, N, compression, seed, block_k, block_n).to(x2d.device)
    x_pad = F.pad(x2d, (0, 1))
    Pb = _padded_P(P, block_n)
    y = x2d.new_empty(T, Pb.shape[0] * block_n)
    for lo, hi in _groups(T, Pb.shape[0], K_red):
        yb = torch.bmm(_sketch(x_pad, idx[lo:hi]), Pb[lo:hi].transpose(1, 2))  # (g, T, BN)
        y[:, lo * block_n:hi * block_n] = yb.transpose(0, 1).reshape(T, -1)
    y = y[:, :N]
    return y if bias is None else y + bias


def ss1_backward_torch(dy2d, x2d, P, compression: int, seed: int, block_k: int, block_n: int,
                       needs=(True, True, True)):
    """Gradients ``(dx, dP, dbias)``, each only where ``needs`` says (``None`` otherwise): dx
    scatters ``dy_j @ P_j`` back through the sketch indices (the transpose of the gather),
    ``dP_j = dy_j.T @ sketch_j(x)``."""
    need_x, need_P, need_b = (bool(f) for f in needs)
    T, K = x2d.shape
    N, K_red = P.shape
    dx = dP = dbias = None
    if need_x or need_P:
        idx = ss1_hash.sketch_index(K, N, compression, seed, block_k, block_n).to(x2d.device)
        x_pad = F.pad(x2d, (0, 1))
        Pb = _padded_P(P, block_n)
        n_blocks = Pb.shape[0]
        dy_pad = F.pad(dy2d, (0, n_blocks * block_n - N))
        dx_pad = torch.zeros_like(x_pad) if need_x else None
        dPb = P.new_empty(n_blocks, block_n, K_red) if need_P else None
        for lo, hi in _groups(T, n_blocks, K_red):
            dyb = dy_pad[:, lo * block_n:hi * block_n].reshape(T, hi - lo, block_n).transpose(0, 1)
            if need_x:
                dxs = torch.bmm(dyb, Pb[lo:hi]).transpose(0, 1).reshape(T, -1)  # (T, g*K_red)
                for u in range(compression):
                    dx_pad.index_add_(1, idx[lo:hi, u].reshape(-1), dxs)
            if need_P:
                dPb[lo:hi] = torch.bmm(dyb.transpose(1, 2), _sketch(x_pad, idx[lo:hi]))
        dx = dx_pad[:, :K] if need_x else None
        dP = dPb.view(-1, K_red)[:N] if need_P else None
    if need_b:
        dbias = dy2d.sum(0)
    return dx, dP, dbias
