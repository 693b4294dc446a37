"""SS1 Triton kernels (docs/design.md, "SS1"): sketch-then-GEMM forward, and the dx / dP backward.

All three kernels compute exactly the map of ``ss1_hash`` (``rotation`` semantics):

    s(t, u, j) = (VEC * (R3 + R2*j + R1*(t+1) + R0*(u+1))) mod BK
    sketch_j(x)[:, t*BK + w] = sum_u x[:, (t*c + u)*BK + (w + s(t, u, j)) mod BK]   (0 beyond K)
    y[:, block j] = sketch_j(x) @ P[block j].T + bias

Layout and tiling, shared by the kernels:

- ``BK`` / ``BN`` are the layer's structure blocks (constexpr; never autotuned). A program's N
  tile is one column block (``TILE_N = next_pow2(BN)``, at least 16, masked back to ``BN``) or,
  for ``BN > 128``, a power-of-two slice of one (``N_SUB`` slices per block): one hash per tile.
- The reduced-K loop steps ``BLOCK_KR`` columns of ``P`` at a time (several ``BK`` chunks when
  ``BK`` is small); ``t`` and ``w`` are per-column vectors, so any ``BK`` (a multiple of 8, not
  only powers of two) works.
- ``R0..R3`` and ``c`` are runtime arguments (``R*`` with ``do_not_specialize``), reduced mod
  ``BK`` by the wrapper (exact: ``s`` is taken mod ``BK``) so the int32 index math cannot
  overflow; every layer with the same ``BK``/``BN``/dtype shares one compiled kernel.
- Only the token tile, ``num_warps`` and ``num_stages`` are autotuned. In the interpreter
  (``triton_common.INTERPRET``) there is one small config (no benchmarking), and ``DOT_FP32`` upcasts
  the ``tl.dot`` operands to fp32 because the interpreter's bf16 ``tl.dot`` returns garbage; on
  the GPU the operands stay in the input dtype (bf16/fp16 tensor cores, fp32 accumulate).
- fp32 inputs use ``input_precision="ieee"`` unless ``torch.backends.cuda.matmul.allow_tf32``
  is set, matching what ``F.linear`` does; fp64 inputs accumulate in fp64.

The launchers take arguments ``ops.check_ss1_args`` has accepted (the op checks them once,
before any kernel runs).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import ops, ss1_hash
from .shapes import next_pow2
from .triton_common import INTERPRET

VEC: tl.constexpr = tl.constexpr(ss1_hash.VEC)

_MAX_TILE_N = 128
_BLOCK_KR = 64  # reduced-K columns per iteration (forward, dP); K columns per dx program


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=1)]
    # Spill-free on sm_90 (checked by compiling to cubin, not by timing): 4 warps up to 32
    # tokens, 8 warps beyond. The c loop nests inside the K loop, so stages matter little.
    return [triton.Config({"BLOCK_T": 16}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 128}, num_warps=8, num_stages=3)]


def _prune_token_tiles(configs, named_args, **kwargs):
    """Drop token tiles larger than T's bucket (decode): they only add masked rows. The
    autotuner passes positional args as ``named_args`` and keyword args as ``kwargs``."""
    cap = max(16, named_args.get("T_BUCKET", kwargs.get("T_BUCKET", 1 << 30)))
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= cap]
    return kept or configs[:1]


_TUNE_KEY = ["T_BUCKET", "N", "K_red", "C"]
_PRUNE = {"early_config_prune": _prune_token_tiles}
_RUNTIME = ["R0", "R1", "R2", "R3", "T_BUCKET"]


@triton.jit
def _sketch_tile(x_tile, stride_xt, mask_t, t, w, j, K, C, R0, R1, R2, R3,
                 BK: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_KR: tl.constexpr):
    """``sketch_j(x)[rows of x_tile, t*BK + w]``: the c rotated chunks summed while loading x.

    ``x_tile`` points at the tile's first row, so the per-element offsets stay int32. Columns
    past K_red have t*c*BK >= K, so the ``k < K`` mask covers them too."""
    x_rows = x_tile + tl.arange(0, BLOCK_T)[:, None] * stride_xt
    # s(t, u, j) = VEC * (R3 + R2*j + R1*(t+1) + R0*(u+1)) mod BK, stepped in u. R* arrive
    # reduced mod BK and j, t+1 are reduced here (exact under the final mod), so h stays small
    # for any layer size; every operand is >= 0, so C-style (GPU) and floor (interpreter) mod
    # agree.
    h = R3 + R2 * (j % BK) + R1 * ((t + 1) % BK) + R0
    k0 = t * (C * BK)
    xs = tl.zeros((BLOCK_T, BLOCK_KR), dtype=ACC)
    for _u in range(0, C):
        k = k0 + (w + (VEC * h) % BK) % BK
        xv = tl.load(x_rows + k[None, :], mask=mask_t[:, None] & (k < K)[None, :], other=0.0)
        xs += xv.to(ACC)
        h += R0
        k0 += BK
    return xs


@triton.jit
def _column_tile(pid_n, N, BN: tl.constexpr, TILE_N: tl.constexpr, N_SUB: tl.constexpr):
    """Column block ``j`` of the ``pid_n``-th N tile, its columns and their mask."""
    j = pid_n // N_SUB
    in_block = (pid_n % N_SUB) * TILE_N + tl.arange(0, TILE_N)
    offs_n = j * BN + in_block
    return j, offs_n, (in_block < BN) & (offs_n < N)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_FP32:  # interpreter only: its half-precision tl.dot is wrong
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ----------------------------------------------------------------------------- forward
@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_RUNTIME)
def _ss1_fwd_kernel(x_ptr, p_ptr, b_ptr, y_ptr, T, K, N, K_red, C, R0, R1, R2, R3, T_BUCKET,
                    stride_xt, stride_pn, stride_yt,
                    HAS_BIAS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                    TILE_N: tl.constexpr, N_SUB: tl.constexpr, BLOCK_KR: tl.constexpr,
                    ACC: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    # 1-D grid over (token tiles x N tiles), N tiles fastest: the programs that re-read (and
    # re-sketch) one x tile for every column block run together, so x comes from L2.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BN) * N_SUB
    pid_n = pid % n_tiles
    pid_t = pid // n_tiles
    j, offs_n, mask_n = _column_tile(pid_n, N, BN, TILE_N, N_SUB)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    x_tile = x_ptr + (pid_t * BLOCK_T).to(tl.int64) * stride_xt
    # P tile (BLOCK_KR, TILE_N): a scalar 64-bit base per iteration plus loop-invariant int32
    # offsets; each column of the tile is a contiguous run of one P row.
    p_tile = p_ptr + (j * BN + (pid_n % N_SUB) * TILE_N).to(tl.int64) * stride_pn
    p_offs = tl.arange(0, TILE_N)[None, :] * stride_pn + tl.arange(0, BLOCK_KR)[:, None]

    acc = tl.zeros((BLOCK_T, TILE_N), dtype=ACC)
    for kr0 in range(0, K_red, BLOCK_KR):
        col = kr0 + tl.arange(0, BLOCK_KR)
        mask_c = col < K_red
        xs = _sketch_tile(x_tile, stride_xt, mask_t, col // BK, col % BK, j, K, C,
                          R0, R1, R2, R3, BK, ACC, BLOCK_T, BLOCK_KR)
        p = tl.load(p_tile + kr0 + p_offs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(xs.to(p.dtype), p, acc, DOT_FP32, PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    y = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- backward: dx
@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_RUNTIME)
def _ss1_dx_kernel(dy_ptr, p_ptr, dx_ptr, T, K, N, K_red, C, R0, R1, R2, R3, T_BUCKET,
                   stride_dyt, stride_pn, stride_dxt,
                   BK: tl.constexpr, BN: tl.constexpr, TILE_N: tl.constexpr,
                   N_SUB: tl.constexpr, BLOCK_K: tl.constexpr,
                   ACC: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    # 1-D grid over (token tiles x K tiles); each program owns dx[token tile, K tile] and loops
    # over all N tiles: dx[:, i*BK + v] = sum_j dy_j @ P[block j, t*BK + (v - s(t,u,j)) % BK].T.
    # The rotation is applied to the P load addresses, so the product lands in v order.
    pid = tl.program_id(0)
    n_k_tiles = tl.cdiv(K, BLOCK_K)
    pid_k = pid % n_k_tiles
    pid_t = pid // n_k_tiles
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    i = offs_k // BK
    v = offs_k % BK
    t = i // C
    h = R3 + R1 * ((t + 1) % BK) + R0 * (i % C + 1)  # s(t, u, j) = VEC * (h + R2*j) mod BK
    t_base = t * BK
    v_pos = v + BK  # keeps v - s >= 0 before the mod
    dy_tile = dy_ptr + (pid_t * BLOCK_T).to(tl.int64) * stride_dyt
    dy_rows = tl.arange(0, BLOCK_T)[:, None] * stride_dyt
    p_rows = tl.arange(0, TILE_N)[:, None] * stride_pn

    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=ACC)
    for pid_n in range(0, tl.cdiv(N, BN) * N_SUB):
        j, offs_n, mask_n = _column_tile(pid_n, N, BN, TILE_N, N_SUB)
        dy = tl.load(dy_tile + dy_rows + offs_n[None, :], mask=mask_t[:, None] & mask_n[None, :],
                     other=0.0)
        col = t_base + (v_pos - (VEC * (h + R2 * (j % BK))) % BK) % BK
        p_tile = p_ptr + (j * BN + (pid_n % N_SUB) * TILE_N).to(tl.int64) * stride_pn
        p = tl.load(p_tile + p_rows + col[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)  # (TILE_N, BLOCK_K)
        acc = _dot(dy, p, acc, DOT_FP32, PRECISION)

    dx = dx_ptr + offs_t.to(tl.int64)[:, None] * stride_dxt + offs_k[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_k[None, :])


# ----------------------------------------------------------------------------- backward: dP
@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_RUNTIME)
def _ss1_dp_kernel(dy_ptr, x_ptr, dp_ptr, T, K, N, K_red, C, R0, R1, R2, R3, T_BUCKET,
                   stride_dyt, stride_xt, stride_dpn,
                   BK: tl.constexpr, BN: tl.constexpr, TILE_N: tl.constexpr,
                   N_SUB: tl.constexpr, BLOCK_KR: tl.constexpr,
                   ACC: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    # 1-D grid over (N tiles x K_red tiles); each program owns one P tile (no atomics) and loops
    # over the token tiles: dP[block j, t*BK + w] += dy_j.T @ sketch_j(x)[:, t*BK + w].
    pid = tl.program_id(0)
    n_kr_tiles = tl.cdiv(K_red, BLOCK_KR)
    pid_kr = pid % n_kr_tiles
    pid_n = pid // n_kr_tiles
    j, offs_n, mask_n = _column_tile(pid_n, N, BN, TILE_N, N_SUB)
    col = pid_kr * BLOCK_KR + tl.arange(0, BLOCK_KR)
    mask_c = col < K_red
    t = col // BK
    w = col % BK

    dy_offs = tl.arange(0, BLOCK_T)[None, :] * stride_dyt + offs_n[:, None]
    dy_tile = dy_ptr  # both tile pointers step BLOCK_T rows (64-bit pointer, int32 steps)
    x_tile = x_ptr
    acc = tl.zeros((TILE_N, BLOCK_KR), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        mask_t = t0 + tl.arange(0, BLOCK_T) < T
        dyt = tl.load(dy_tile + dy_offs, mask=mask_n[:, None] & mask_t[None, :],
                      other=0.0)  # (TILE_N, BLOCK_T)
        xs = _sketch_tile(x_tile, stride_xt, mask_t, t, w, j, K, C,
                          R0, R1, R2, R3, BK, ACC, BLOCK_T, BLOCK_KR)
        acc = _dot(dyt, xs.to(dyt.dtype), acc, DOT_FP32, PRECISION)
        dy_tile += BLOCK_T * stride_dyt
        x_tile += BLOCK_T * stride_xt

    dp = dp_ptr + offs_n.to(tl.int64)[:, None] * stride_dpn + col[None, :]
    tl.store(dp, acc.to(dp_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------- launchers
def _common(x: Tensor, N: int, compression: int, coeffs, block_k: int, block_n: int):
    """Launch arguments shared by the three kernels."""
    tile_n = max(16, min(_MAX_TILE_N, next_pow2(block_n)))
    half = x.dtype in (torch.float16, torch.bfloat16)
    fp32_ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    R = [int(r) % block_k for r in coeffs]  # exact: s is reduced mod BK anyway
    runtime = dict(C=compression, R0=R[0], R1=R[1], R2=R[2], R3=R[3],
                   T_BUCKET=min(next_pow2(x.shape[0]), 4096))
    static = dict(BK=block_k, BN=block_n, TILE_N=tile_n, N_SUB=-(-block_n // tile_n),
                  ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
                  DOT_FP32=INTERPRET and half, PRECISION="ieee" if fp32_ieee else "tf32")
    return runtime, static


def _block_kr(width: int) -> int:
    return max(16, min(_BLOCK_KR, next_pow2(width)))


def ss1_forward_triton(x: Tensor, P: Tensor, bias: Optional[Tensor], compression: int,
                       coeffs: tuple[int, int, int, int], block_k: int, block_n: int) -> Tensor:
    """``y = x @ W + bias`` with ``W`` read from ``P`` by the SS1 hash (coeffs = R0..R3).

    ``x`` is ``(T, K)``, ``P`` ``(N, K_red)``; returns ``(T, N)`` in ``x.dtype``. ``P`` and
    ``bias`` are cast to ``x.dtype`` here (a dtype mismatch is not an error); the product
    accumulates in fp32 (fp64 for fp64 inputs). The arguments are those
    ``ops.check_ss1_args`` accepted, with ``x`` 2-D and ``coeffs = hash_coeffs(seed)``."""
    x = x.contiguous()
    P = P.to(x.dtype).contiguous()
    T, K = x.shape
    N, K_red = P.shape
    y = x.new_empty(T, N)
    if T == 0:
        return y
    b = bias.to(x.dtype).contiguous() if bias is not None else P  # dummy pointer when absent
    runtime, static = _common(x, N, compression, coeffs, block_k, block_n)
    n_tiles = -(-N // block_n) * static["N_SUB"]
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * n_tiles,)  # noqa: E731
    _ss1_fwd_kernel[grid](x, P, b, y, T, K, N, K_red, **runtime,
                          stride_xt=x.stride(0), stride_pn=P.stride(0), stride_yt=y.stride(0),
                          HAS_BIAS=bias is not None, BLOCK_KR=_block_kr(K_red), **static)
    return y


def ss1_backward_triton(dy: Tensor, x: Tensor, P: Tensor, bias: Optional[Tensor],
                        compression: int, coeffs: tuple[int, int, int, int], block_k: int,
                        block_n: int, needs_input_grad: Sequence[bool] = (True, True, True)):
    """``(dx, dP, dbias)`` of ``ss1_forward_triton``; ``None`` for each grad not needed.

    ``dx`` and ``dP`` are Triton kernels (``_ss1_dx_kernel``: the transpose gather, rotation
    on the ``P`` load addresses; ``_ss1_dp_kernel``: ``dy_j.T @ sketch_j(x)``, one program per
    ``P`` tile, no atomics); ``dbias = dy.sum(0)`` is a torch reduction (fp32 accumulate).
    ``needs_input_grad`` is ``(x, P, bias)``; ``dbias`` is computed when its flag is set even if
    ``bias`` is None (the caller knows whether the layer has one). Grads come back in the
    dtypes of ``x``, ``P`` and ``bias`` (``dy``'s dtype when ``bias`` is None). The arguments
    are those the ops accepted (``x`` and ``dy`` 2-D, ``dy`` ``(T, N)``)."""
    T, K = x.shape
    N, K_red = P.shape
    need_x, need_P, need_b = (bool(f) for f in needs_input_grad)
    x = x.contiguous()
    dy_x = dy.to(x.dtype).contiguous()
    Pc = P.to(x.dtype).contiguous()
    runtime, static = _common(x, N, compression, coeffs, block_k, block_n)

    dx = dP = db = None
    if need_x:
        dx = x.new_empty(T, K)
        if T > 0:
            bk = _block_kr(K)
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(K, bk),)  # noqa
            _ss1_dx_kernel[grid](dy_x, Pc, dx, T, K, N, K_red, **runtime,
                                 stride_dyt=dy_x.stride(0), stride_pn=Pc.stride(0),
                                 stride_dxt=dx.stride(0), BLOCK_K=bk, **static)
    if need_P:
        dP = torch.empty(N, K_red, dtype=P.dtype, device=P.device)
        if T == 0:
            dP.zero_()
        else:
            bkr = _block_kr(K_red)
            n_tiles = -(-N // block_n) * static["N_SUB"]
            grid = (n_tiles * triton.cdiv(K_red, bkr),)
            _ss1_dp_kernel[grid](dy_x, x, dP, T, K, N, K_red, **runtime,
                                 stride_dyt=dy_x.stride(0), stride_xt=x.stride(0),
                                 stride_dpn=dP.stride(0), BLOCK_KR=bkr, **static)
    if need_b:
        out = bias.dtype if bias is not None else dy.dtype
        db = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32)
        db = db.to(out)
    return dx, dP, db


# ----------------------------------------------------------------------------- registration
# The CUDA kernels of ``structfx::ss1_linear`` / ``ss1_linear_backward``: registered when this
# module is imported (kernels/ops.py registers a stand-in that imports it on the first CUDA
# call). Called directly they also run on CPU tensors under TRITON_INTERPRET=1 (tests).
@torch.library.register_kernel("structfx::ss1_linear", "cuda")
def ss1_linear_cuda(x: Tensor, P: Tensor, bias: Optional[Tensor], compression: int, seed: int,
                    block_k: int, block_n: int) -> Tensor:
    ops.check_ss1_args(x, P, bias, compression, seed, block_k, block_n)
    y = ss1_forward_triton(ops.tokens_2d(x), P, bias, compression, ss1_hash.hash_coeffs(seed),
                           block_k, block_n)
    return y.reshape(*x.shape[:-1], P.shape[0])


@torch.library.register_kernel("structfx::ss1_linear_backward", "cuda")
def ss1_linear_backward_cuda(dy: Tensor, x: Tensor, P: Tensor, compression: int, seed: int,
                             block_k: int, block_n: int, needs: Sequence[bool]
                             ) -> tuple[Tensor, ...]:
    ops.check_backward_args("ss1_linear_backward", dy, x, P.shape[0], needs, 3)
    dx, dP, db = ss1_backward_triton(ops.tokens_2d(dy), ops.tokens_2d(x), P, None, compression,
                                     ss1_hash.hash_coeffs(seed), block_k, block_n, needs)
    return ops.grads_out((None if dx is None else dx.reshape(x.shape), dP, db), dy)
