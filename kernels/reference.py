"""Plain, readable PyTorch references of the structured ops: the oracle for every test.

They materialize the dense weight on purpose (slow, obviously right); the fast paths in
``blast_torch.py`` / ``ss1_torch.py`` / ``*_triton.py`` never do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ss1_hash


def blast_dense_weight(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, out_features: int,
                       in_features: int) -> torch.Tensor:
    """``W`` ``(m, n)`` with blocks ``W[i, j] = U[i] @ diag(S[i, j]) @ V[j].T`` (padding cut)."""
    b1, p, r = U.shape
    b2, q, _ = V.shape
    blocks = torch.einsum("ipr,ijr,jqr->ipjq", U, S, V)  # (b1, p, b2, q)
    return blocks.reshape(b1 * p, b2 * q)[:out_features, :in_features]


def blast_linear_reference(x, U, S, V, bias, out_features: int):
    W = blast_dense_weight(U, S, V, out_features, x.shape[-1])
    return F.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))


def ss1_linear_reference(x, P, bias, compression: int, seed: int, block_k: int, block_n: int):
    W = ss1_hash.dense_weight(P, x.shape[-1], compression, seed, block_k, block_n)  # (K, N)
    y = x @ W.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
