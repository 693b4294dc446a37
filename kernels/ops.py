"""``torch.ops.structfx.blast_linear`` / ``ss1_linear``: the structured ops as torch.library ops.

Each op is a ``custom_op`` (opaque to Dynamo, AOT and export, so graphs hold one node per
layer) with a fake impl, an autograd formula and a FLOP formula. The implementation picks the
Triton kernels for CUDA tensors and the bmm / gather PyTorch paths otherwise. A plain
``custom_op`` rather than ``triton_op``: on a CPU-only machine a ``triton_op`` breaks
``torch.compile`` even when a CPU kernel is registered (see notes/pytorch.md).

The backward of each op is itself an op (``*_backward``), so compiled training graphs and
exported graphs keep it as one node and CUDA backward runs the Triton kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import blast_torch, ss1_hash, ss1_torch

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
def _check_common(name: str, x: Tensor, params: dict[str, Tensor], bias: Optional[Tensor]):
    if x.dim() < 1:
        raise ValueError(f"{name}: input must have at least 1 dimension, got a scalar")
    if x.dtype not in _FLOAT:
        raise TypeError(f"{name}: input dtype must be a floating type, got {x.dtype}")
    for pname, p in params.items():
        if p.dtype != x.dtype:
            raise TypeError(f"{name}: {pname} has dtype {p.dtype} but the input is {x.dtype}; "
                            f"cast the factors (BlastLinear/SS1Linear do this for you)")
        if p.device != x.device:
            raise ValueError(f"{name}: {pname} is on {p.device} but the input is on {x.device}")
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        raise TypeError(f"{name}: bias must match the input's dtype and device")


def check_blast_args(x: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor],
                     out_features: int) -> None:
    _check_common("blast_linear", x, {"U": U, "S": S, "V": V}, bias)
    if U.dim() != 3 or S.dim() != 3 or V.dim() != 3:
        raise ValueError("blast_linear: U (b1, p, r), S (b1, b2, r), V (b2, q, r) must be 3-D; got "
                         f"U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)}")
    b1, p, r = U.shape
    b2, q, rv = V.shape
    if tuple(S.shape) != (b1, b2, r) or rv != r:
        raise ValueError(f"blast_linear: factor shapes disagree: U {tuple(U.shape)}, "
                         f"S {tuple(S.shape)} (expected {(b1, b2, r)}), V {tuple(V.shape)}")
    n = x.shape[-1]
    if not (b2 * (q - 1) < n <= b2 * q):
        raise ValueError(f"blast_linear: input has {n} features but V covers b2*q = {b2}*{q} "
                         f"(expected {b2 * (q - 1) + 1}..{b2 * q})")
    if not (b1 * (p - 1) < out_features <= b1 * p):
        raise ValueError(f"blast_linear: out_features={out_features} does not fit U's "
                         f"b1*p = {b1}*{p}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"blast_linear: bias has shape {tuple(bias.shape)}, "
                         f"expected ({out_features},)")


def check_ss1_args(x: Tensor, P: Tensor, bias: Optional[Tensor], compression: int, seed: int,
                   block_k: int, block_n: int) -> None:
    _check_common("ss1_linear", x, {"P": P}, bias)
    if P.dim() != 2:
        raise ValueError(f"ss1_linear: P must be 2-D (N, K_red), got {tuple(P.shape)}")
    K, (N, K_red) = x.shape[-1], P.shape
    ss1_hash.check_config(K, N, compression, block_k, block_n)
    want = ss1_hash.reduced_k(K, compression, block_k)
    if K_red != want:
        raise ValueError(f"ss1_linear: P has {K_red} columns but in_features={K} at compression "
                         f"{compression}, block_k={block_k} needs K_red={want}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"ss1_linear: bias has shape {tuple(bias.shape)}, expected ({N},)")


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


# ----------------------------------------------------------------------------- BLAST
@torch.library.custom_op("structfx::blast_linear", mutates_args=())
def blast_linear(x: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor],
                 out_features: int) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` the BLAST matrix of ``(U, S, V)`` (spec/blast.md)."""
    check_blast_args(x, U, S, V, bias, out_features)
    x2d = _flat(x)
    if x.is_cuda:
        from .blast_triton import blast_forward_triton
        y = blast_forward_triton(x2d, U.contiguous(), S.contiguous(), V.contiguous(), bias,
                                 out_features)
    else:
        y = blast_torch.blast_forward_torch(x2d, U, S, V, bias, out_features)
    return y.contiguous().reshape(*x.shape[:-1], out_features)


@blast_linear.register_fake
def _(x, U, S, V, bias, out_features):
    check_blast_args(x, U, S, V, bias, out_features)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("structfx::blast_linear_backward", mutates_args=())
def blast_linear_backward(dy: Tensor, x: Tensor, U: Tensor, S: Tensor, V: Tensor,
                          out_features: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dU, dS, dV, dbias)`` of ``blast_linear``."""
    dy2d, x2d = _flat(dy), _flat(x)
    if x.is_cuda:
        from .blast_triton import blast_backward_triton
        dx, dU, dS, dV, db = blast_backward_triton(
            dy2d, x2d, U.contiguous(), S.contiguous(), V.contiguous(), None, out_features,
            (True, True, True, True, True))
    else:
        dx, dU, dS, dV, db = blast_torch.blast_backward_torch(dy2d, x2d, U, S, V, out_features)
    return tuple(g.contiguous() for g in (dx.reshape(x.shape), dU, dS, dV, db))


@blast_linear_backward.register_fake
def _(dy, x, U, S, V, out_features):
    return (x.new_empty(x.shape), U.new_empty(U.shape), S.new_empty(S.shape),
            V.new_empty(V.shape), dy.new_empty(out_features))


def _blast_setup(ctx, inputs, output):
    x, U, S, V, bias, out_features = inputs
    ctx.save_for_backward(x, U, S, V)
    ctx.out_features = out_features
    ctx.has_bias = bias is not None


def _blast_backward(ctx, dy):
    x, U, S, V = ctx.saved_tensors
    dx, dU, dS, dV, db = torch.ops.structfx.blast_linear_backward(dy, x, U, S, V,
                                                                  ctx.out_features)
    return dx, dU, dS, dV, (db if ctx.has_bias else None), None


blast_linear.register_autograd(_blast_backward, setup_context=_blast_setup)


def blast_flops(x_shape, U_shape, S_shape, V_shape) -> int:
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    b1, p, r = U_shape
    b2, q, _ = V_shape
    return 2 * tokens * r * (b2 * q + b1 * p + b1 * b2)


@register_flop_formula(torch.ops.structfx.blast_linear)
def _(x_shape, U_shape, S_shape, V_shape, *args, **kwargs) -> int:
    return blast_flops(x_shape, U_shape, S_shape, V_shape)


@register_flop_formula(torch.ops.structfx.blast_linear_backward)
def _(dy_shape, x_shape, U_shape, S_shape, V_shape, *args, **kwargs) -> int:
    return 2 * blast_flops(x_shape, U_shape, S_shape, V_shape)


# ----------------------------------------------------------------------------- SS1
@torch.library.custom_op("structfx::ss1_linear", mutates_args=())
def ss1_linear(x: Tensor, P: Tensor, bias: Optional[Tensor], compression: int, seed: int,
               block_k: int, block_n: int) -> Tensor:
    """``y = x @ W + bias`` with ``W (K, N)`` read from ``P (N, K_red)`` by the SS1 hash."""
    check_ss1_args(x, P, bias, compression, seed, block_k, block_n)
    x2d = _flat(x)
    if x.is_cuda:
        from .ss1_triton import ss1_forward_triton
        y = ss1_forward_triton(x2d, P.contiguous(), bias, compression,
                               ss1_hash.hash_coeffs(seed), block_k, block_n)
    else:
        y = ss1_torch.ss1_forward_torch(x2d, P, bias, compression, seed, block_k, block_n)
    return y.contiguous().reshape(*x.shape[:-1], P.shape[0])


@ss1_linear.register_fake
def _(x, P, bias, compression, seed, block_k, block_n):
    check_ss1_args(x, P, bias, compression, seed, block_k, block_n)
    return x.new_empty(*x.shape[:-1], P.shape[0])


@torch.library.custom_op("structfx::ss1_linear_backward", mutates_args=())
def ss1_linear_backward(dy: Tensor, x: Tensor, P: Tensor, compression: int, seed: int,
                        block_k: int, block_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dP, dbias)`` of ``ss1_linear``."""
    dy2d, x2d = _flat(dy), _flat(x)
    if x.is_cuda:
        from .ss1_triton import ss1_backward_triton
        dx, dP, db = ss1_backward_triton(dy2d, x2d, P.contiguous(), None, compression,
                                         ss1_hash.hash_coeffs(seed), block_k, block_n,
                                         (True, True, True))
    else:
        dx, dP, db = ss1_torch.ss1_backward_torch(dy2d, x2d, P, compression, seed, block_k,
                                                  block_n)
    return tuple(g.contiguous() for g in (dx.reshape(x.shape), dP, db))


@ss1_linear_backward.register_fake
def _(dy, x, P, compression, seed, block_k, block_n):
    return x.new_empty(x.shape), P.new_empty(P.shape), dy.new_empty(P.shape[0])


def _ss1_setup(ctx, inputs, output):
    x, P, bias, compression, seed, block_k, block_n = inputs
    ctx.save_for_backward(x, P)
    ctx.args = (compression, seed, block_k, block_n)
    ctx.has_bias = bias is not None


def _ss1_backward(ctx, dy):
    x, P = ctx.saved_tensors
    dx, dP, db = torch.ops.structfx.ss1_linear_backward(dy, x, P, *ctx.args)
    return dx, dP, (db if ctx.has_bias else None), None, None, None, None


ss1_linear.register_autograd(_ss1_backward, setup_context=_ss1_setup)


def ss1_flops(x_shape, P_shape, block_n: int) -> int:
    """GEMM FLOPs (``2 T N K_red``) plus the sketch's additions (``T K`` per column block)."""
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    N, K_red = P_shape
    return 2 * tokens * N * K_red + tokens * x_shape[-1] * -(-N // block_n)


@register_flop_formula(torch.ops.structfx.ss1_linear)
def _(x_shape, P_shape, bias_shape, compression, seed, block_k, block_n, *args, **kw) -> int:
    return ss1_flops(x_shape, P_shape, block_n)


@register_flop_formula(torch.ops.structfx.ss1_linear_backward)
def _(dy_shape, x_shape, P_shape, compression, seed, block_k, block_n, *args, **kw) -> int:
    return 2 * ss1_flops(x_shape, P_shape, block_n)
