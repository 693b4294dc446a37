"""BLAST Triton kernels (docs/design.md, "BLAST"): ``y = x @ W.T + bias`` without ever forming ``W``.

``W`` ``(m, n)`` has blocks ``W[i, j] = U[i] diag(S[i, j]) V[j].T`` with ``U (b1, p, r)``,
``S (b1, b2, r)``, ``V (b2, q, r)``; ``m <= b1*p`` and ``n <= b2*q`` (the rest is padding).

Forward = two kernels, both with fp32 accumulation (fp64 for fp64 inputs):

1. ``_blast_block_gemm_kernel`` -- stage 1, ``z[j] = x[j] @ V[j]`` for every block-column ``j``.
   Grid ``(cdiv(T, BLOCK_T) * cdiv(r, BLOCK_R), b2)``; a program owns one ``(BLOCK_T, BLOCK_R)``
   tile of ``z[j]`` and loops over the ``q`` input columns of block ``j`` in ``BLOCK_K`` steps.
   ``x`` is read in place (no padded copy): loads of columns ``j*q + k >= n`` are masked to 0,
   and so are the matching padding rows of ``V[j]``. ``z`` is written ``(b2, T, r)``.
2. ``_blast_mix_gemm_kernel`` -- stages 2 + 3 fused, ``y[i] = sum_j (S[i, j] * z[j]) @ U[i].T``.
   Grid ``(cdiv(T, BLOCK_T) * cdiv(p, BLOCK_P), b1)``, p tiles fastest (the programs that read
   the same ``z`` tiles run together, so ``z`` is re-read from L2). Per ``BLOCK_R`` slice of the
   rank the *prologue* loads the ``b2`` tiles ``z[j][t-tile, r-slice]``, scales each by
   ``S[i, j, r-slice]`` and sums them in fp32 registers (the diagonal mixing; ``w`` never
   touches memory), casts ``w`` to the factor dtype and does one ``tl.dot`` with the
   ``(BLOCK_R, BLOCK_P)`` tile of ``U[i].T``. The epilogue adds the bias and stores only the
   rows ``i*p + c < out_features`` (``U``'s padding rows are never stored).

``z`` is kept in the compute dtype (``x.dtype``; bf16 on the target): ``z`` is the one
intermediate that goes through HBM (``b2*r`` values per token, written once and re-read by
every p tile), so bf16 halves that traffic -- the cost the performance notes warn about. The
precision cost is one extra bf16 rounding per ``z`` entry before an fp32 mix; ``w`` has to be
rounded to bf16 for the tensor-core dot anyway, so the error stays the order of a bf16
``F.linear``. fp32 / fp64 inputs keep fp32 / fp64 ``z``.

The mix is done on CUDA cores in the U-GEMM prologue (``b2 * BLOCK_T * BLOCK_R`` FMAs per
``BLOCK_T x BLOCK_R x BLOCK_P`` tensor-core dot), recomputed by each p tile; large ``BLOCK_P``
amortizes it, which is why the autotuned p tiles go up to 256.

Small T (decode) uses the same two kernels: the autotune pruner clamps ``BLOCK_T`` to the
token count (16 for T <= 16) and the narrow r / p tile configs give ``b2 * r / BLOCK_R`` and
``b1 * p / BLOCK_P`` programs, enough to spread the weight reads over the SMs. There is no
separate one-kernel decode path: one kernel must either re-read all of ``V`` for every output
tile or split the rank across programs and reduce ``y`` with atomics / a second pass; neither
is obviously better than two launches without measurements (CUDA graphs remove most of the
launch cost).

Autotuning (GPU): a few configs per kernel (module constants below), keyed on the
power-of-two token bucket and the block sizes; tiles are clamped to the problem size. When the
dot cannot use tensor cores (fp32 without TF32, fp64) output tiles above 64x64 are pruned.
All configs were compiled for sm_90 with ptxas (bf16 / fp16 / fp32 / fp64, no spills in the
kept bf16 set, wgmma for BLOCK_T >= 64) but never run on a GPU.

Backward (``blast_backward_triton``) is an autograd formula built from the same kernels:
``dw = stage1(dy, U)`` (the block GEMM with ``U`` in place of ``V``), ``dx`` = the fused
mix + GEMM with transposed factors (``W.T`` has blocks ``V[j] diag(S[i, j]) U[i].T``: the
kernel runs with ``U' = V``, ``S' = S.transpose(0, 1)`` as a strided view, input ``dw``),
``z = stage1(x, V)`` and the mixes ``w = mix(S, z)``, ``dz = mix(S.T, dw)`` come from
``_blast_mix_kernel``; the weight grads ``dU[i] = dy[i].T w[i]``, ``dV[j] = x[j].T dz[j]``,
``dS[i, j] = sum_t dw[i] * z[j]`` are torch ``bmm`` on those Triton-produced intermediates.

Dtypes: the factors and the bias are cast to ``x.dtype`` in the wrappers (a mismatch, e.g.
fp32 master factors with bf16 activations, is not an error). The launchers take arguments
``ops.check_blast_args`` has accepted (the op checks them once, before any kernel runs). In
the interpreter (``triton_common.INTERPRET``) there is one small autotune config and ``DOT_FP32`` upcasts the ``tl.dot`` operands to fp32
(the interpreter's bf16/fp16 ``tl.dot`` returns garbage); on the GPU the operands stay in the
input dtype (tensor cores). fp32 inputs use ``input_precision="ieee"`` unless
``torch.backends.cuda.matmul.allow_tf32`` is set (matching ``F.linear``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import ops
from .blast_torch import split_blocks
from .shapes import next_pow2
from .triton_common import INTERPRET

_MAX_T_BUCKET = 4096
# Mix loops over <= this many block-columns are unrolled (tl.static_range). sm_90 compiles
# (ptxas, no GPU run) showed NJ = 16 unrolled at 254-255 registers and a spill with the
# 128x256 tile, while the rolled loop stays at 130-210; small b (2-8) unrolls cheaply.
_UNROLL_MAX_J = 8


# ----------------------------------------------------------------------------- autotune
def _cfg(num_warps: int, num_stages: int, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def _small_cfg(*names: str) -> list[triton.Config]:
    return [_cfg(4, 1, **{n: 16 for n in names})]


if INTERPRET:
    _GEMM_CONFIGS = _small_cfg("BLOCK_T", "BLOCK_R", "BLOCK_K")
    _MIXGEMM_CONFIGS = _small_cfg("BLOCK_T", "BLOCK_P", "BLOCK_R")
    _MIX_CONFIGS = _small_cfg("BLOCK_T", "BLOCK_R")
else:  # H100 / H200 oriented; the pruner below clamps tiles to the problem size.
    _GEMM_CONFIGS = [
        # decode: one token tile, narrow r tiles -> b2 * r / BLOCK_R programs, long K steps
        _cfg(4, 4, BLOCK_T=16, BLOCK_R=32, BLOCK_K=128),
        _cfg(4, 4, BLOCK_T=16, BLOCK_R=64, BLOCK_K=128),
        _cfg(4, 4, BLOCK_T=32, BLOCK_R=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_T=64, BLOCK_R=64, BLOCK_K=64),
        _cfg(4, 3, BLOCK_T=64, BLOCK_R=128, BLOCK_K=64),
        _cfg(4, 3, BLOCK_T=128, BLOCK_R=64, BLOCK_K=64),
        _cfg(8, 3, BLOCK_T=128, BLOCK_R=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_T=128, BLOCK_R=128, BLOCK_K=32),
        _cfg(8, 3, BLOCK_T=256, BLOCK_R=128, BLOCK_K=64),
    ]
    _MIXGEMM_CONFIGS = [
        _cfg(4, 4, BLOCK_T=16, BLOCK_P=32, BLOCK_R=64),
        _cfg(4, 4, BLOCK_T=16, BLOCK_P=64, BLOCK_R=64),
        _cfg(4, 4, BLOCK_T=16, BLOCK_P=128, BLOCK_R=64),
        _cfg(4, 3, BLOCK_T=64, BLOCK_P=64, BLOCK_R=32),
        _cfg(4, 3, BLOCK_T=64, BLOCK_P=128, BLOCK_R=32),
        _cfg(4, 3, BLOCK_T=64, BLOCK_P=128, BLOCK_R=64),
        _cfg(8, 3, BLOCK_T=64, BLOCK_P=256, BLOCK_R=64),
        _cfg(8, 3, BLOCK_T=128, BLOCK_P=128, BLOCK_R=32),
        _cfg(8, 3, BLOCK_T=128, BLOCK_P=128, BLOCK_R=64),
        _cfg(8, 3, BLOCK_T=128, BLOCK_P=256, BLOCK_R=32),
    ]
    _MIX_CONFIGS = [
        _cfg(4, 2, BLOCK_T=16, BLOCK_R=128),
        _cfg(4, 2, BLOCK_T=32, BLOCK_R=128),
        _cfg(4, 2, BLOCK_T=64, BLOCK_R=64),
        _cfg(8, 2, BLOCK_T=64, BLOCK_R=128),
    ]


_FMA_TILE_AREA = 64 * 64  # largest output tile kept when the dot runs on FMA units


def _clamp_pruner(caps: dict[str, str], area: tuple[str, str] | None = None):
    """``early_config_prune`` that clamps each tile to ``max(16, next_pow2(size))`` of the size
    argument named in ``caps`` and drops the duplicates this makes (tiny or decode problems then
    only benchmark the few configs that differ).

    With ``area`` (the two output-tile names) and ``PRECISION == "ieee"`` (fp32 without TF32, or
    fp64: the dot runs on FMA units, not tensor cores) output tiles above 64x64 are dropped: in
    sm_90 compiles they spill registers heavily (ptxas, not measured on a GPU)."""

    def prune(configs, named_args, **kwargs):
        limit = {blk: max(16, next_pow2(named_args[arg])) for blk, arg in caps.items()}
        seen, out = set(), []
        for c in configs:
            kw = {k: (min(v, limit[k]) if k in limit else v) for k, v in c.kwargs.items()}
            key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
        if area is not None and kwargs.get("PRECISION") == "ieee":
            size = lambda c: c.kwargs[area[0]] * c.kwargs[area[1]]  # noqa: E731
            small = [c for c in out if size(c) <= _FMA_TILE_AREA]
            out = small or [min(out, key=size)]
        return out

    return prune


# ----------------------------------------------------------------------------- stage 1
@triton.autotune(configs=_GEMM_CONFIGS, key=["T_BUCKET", "KB", "R", "K"],
                 prune_configs_by={"early_config_prune": _clamp_pruner(
                     {"BLOCK_T": "T_BUCKET", "BLOCK_R": "R", "BLOCK_K": "KB"},
                     area=("BLOCK_T", "BLOCK_R"))})
@triton.jit(do_not_specialize=["T_BUCKET"])
def _blast_block_gemm_kernel(a_ptr, b_ptr, out_ptr, T, K, KB, R, T_BUCKET,
                             stride_at, stride_bb, stride_bk, stride_br, stride_ob, stride_ot,
                             ACC: tl.constexpr, DOT_FP32: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[j, t, :] = a[t, j*KB:(j+1)*KB] @ B[j]``: a ``(T, K)`` (unit column stride; columns
    ``>= K`` of the last block are padding, masked), ``B`` ``(NB, KB, R)``, out ``(NB, T, R)``.
    Forward: ``a = x, B = V``; backward: ``a = dy, B = U``."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    n_r = (R + BLOCK_R - 1) // BLOCK_R  # (not tl.cdiv: a jit call, slow to interpret)
    pid_r = pid % n_r  # r tiles fastest: consecutive programs share the x tile
    pid_t = pid // n_r
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_r = offs_r < R
    a_rows = a_ptr + offs_t.to(tl.int64)[:, None] * stride_at + (j * KB).to(tl.int64)
    b_blk = b_ptr + j.to(tl.int64) * stride_bb + offs_r[None, :] * stride_br
    k_valid = tl.minimum(KB, K - j * KB)  # block j's real columns (fewer in the last block)

    acc = tl.full((BLOCK_T, BLOCK_R), 0, dtype=ACC)
    for k0 in range(0, KB, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_valid
        a = tl.load(a_rows + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_blk + offs_k[:, None] * stride_bk, mask=mask_k[:, None] & mask_r[None, :],
                    other=0.0)
        if DOT_FP32:  # interpreter only: its half-precision tl.dot returns garbage
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out = (out_ptr + j.to(tl.int64) * stride_ob + offs_t.to(tl.int64)[:, None] * stride_ot
           + offs_r[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_r[None, :])


# ----------------------------------------------------------------------------- stages 2 + 3
@triton.autotune(configs=_MIXGEMM_CONFIGS, key=["T_BUCKET", "P", "R", "NJ", "M"],
                 prune_configs_by={"early_config_prune": _clamp_pruner(
                     {"BLOCK_T": "T_BUCKET", "BLOCK_P": "P", "BLOCK_R": "R"},
                     area=("BLOCK_T", "BLOCK_P"))})
@triton.jit(do_not_specialize=["T_BUCKET"])
def _blast_mix_gemm_kernel(z_ptr, s_ptr, u_ptr, bias_ptr, y_ptr, T, M, P, R, T_BUCKET,
                           stride_zb, stride_zt, stride_si, stride_sj, stride_sr,
                           stride_ub, stride_up, stride_ur, stride_yt,
                           NJ: tl.constexpr, UNROLL_J: tl.constexpr, HAS_BIAS: tl.constexpr,
                           ACC: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """``y[t, i*P + c] = sum_r (sum_j S[i, j, r] z[j, t, r]) U[i, c, r] (+ bias)`` for
    ``i*P + c < M``: z ``(NJ, T, R)``, S ``(b1, NJ, R)`` (any strides), U ``(b1, P, R)``."""
    pid = tl.program_id(0)
    i = tl.program_id(1)
    n_p = (P + BLOCK_P - 1) // BLOCK_P
    pid_p = pid % n_p  # p tiles fastest: the programs re-reading one z tile run together
    pid_t = pid // n_p
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_t = offs_t < T
    mask_p = offs_p < P
    z_rows = z_ptr + offs_t.to(tl.int64)[:, None] * stride_zt
    s_row = s_ptr + i.to(tl.int64) * stride_si
    u_blk = u_ptr + i.to(tl.int64) * stride_ub + offs_p[None, :] * stride_up

    acc = tl.full((BLOCK_T, BLOCK_P), 0, dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        mask_zr = mask_t[:, None] & mask_r[None, :]
        # prologue: the diagonal mixing w = sum_j S[i, j, r-slice] * z[j][t-tile, r-slice]
        # (pointer increments keep j * stride_zb out of int32)
        w = tl.full((BLOCK_T, BLOCK_R), 0, dtype=ACC)
        zp = z_rows + offs_r[None, :]
        sp = s_row + offs_r * stride_sr
        if UNROLL_J:
            for _j in tl.static_range(NJ):
                zt = tl.load(zp, mask=mask_zr, other=0.0)
                s = tl.load(sp, mask=mask_r, other=0.0)
                w += zt.to(ACC) * s.to(ACC)[None, :]
                zp += stride_zb
                sp += stride_sj
        else:
            for _j in range(0, NJ):
                zt = tl.load(zp, mask=mask_zr, other=0.0)
                s = tl.load(sp, mask=mask_r, other=0.0)
                w += zt.to(ACC) * s.to(ACC)[None, :]
                zp += stride_zb
                sp += stride_sj
        u = tl.load(u_blk + offs_r[:, None] * stride_ur, mask=mask_r[:, None] & mask_p[None, :],
                    other=0.0)  # (BLOCK_R, BLOCK_P) tile of U[i].T
        w = w.to(u.dtype)  # the dot runs in the factor dtype (bf16 tensor cores on the GPU)
        if DOT_FP32:  # interpreter only (the dot helper is inlined: nested jit calls are slow
            w = w.to(tl.float32)  # in the interpreter)
            u = u.to(tl.float32)
        acc = tl.dot(w, u, acc, input_precision=PRECISION)

    offs_m = i * P + offs_p
    mask_m = mask_p & (offs_m < M)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_m, mask=mask_m, other=0.0).to(ACC)[None, :]
    y = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_m[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_m[None, :])


# ----------------------------------------------------------------------------- mix alone
@triton.autotune(configs=_MIX_CONFIGS, key=["T_BUCKET", "R", "NJ"],
                 prune_configs_by={"early_config_prune": _clamp_pruner(
                     {"BLOCK_T": "T_BUCKET", "BLOCK_R": "R"})})
@triton.jit(do_not_specialize=["T_BUCKET"])
def _blast_mix_kernel(z_ptr, s_ptr, out_ptr, T, R, NJ, T_BUCKET,
                      stride_zb, stride_zt, stride_si, stride_sj, stride_sr,
                      stride_ob, stride_ot,
                      ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """``out[i, t, r] = sum_j S[i, j, r] z[j, t, r]`` (backward only: ``w`` and ``dz``)."""
    pid = tl.program_id(0)
    i = tl.program_id(1)
    n_r = (R + BLOCK_R - 1) // BLOCK_R  # (not tl.cdiv: a jit call, slow to interpret)
    offs_t = (pid // n_r) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = (pid % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    mask = (offs_t < T)[:, None] & mask_r[None, :]
    z_rows = z_ptr + offs_t.to(tl.int64)[:, None] * stride_zt + offs_r[None, :]
    s_row = s_ptr + i.to(tl.int64) * stride_si + offs_r * stride_sr
    acc = tl.full((BLOCK_T, BLOCK_R), 0, dtype=ACC)
    for _j in range(0, NJ):
        zt = tl.load(z_rows, mask=mask, other=0.0)
        s = tl.load(s_row, mask=mask_r, other=0.0)
        acc += zt.to(ACC) * s.to(ACC)[None, :]
        z_rows += stride_zb
        s_row += stride_sj
    out = (out_ptr + i.to(tl.int64) * stride_ob + offs_t.to(tl.int64)[:, None] * stride_ot
           + offs_r[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _static(dtype: torch.dtype) -> dict:
    """Compile-time kernel flags for a compute dtype."""
    half = dtype in (torch.float16, torch.bfloat16)
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dict(ACC=tl.float64 if dtype == torch.float64 else tl.float32,
                DOT_FP32=INTERPRET and half,
                PRECISION="tf32" if (half or tf32) else "ieee")


def _t_bucket(T: int) -> int:
    return min(next_pow2(T), _MAX_T_BUCKET)


def _rowmajor(x: Tensor) -> Tensor:
    """Unit column stride (any row stride) without a copy when possible."""
    return x if x.stride(1) == 1 else x.contiguous()


def _block_gemm(a: Tensor, B: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(NB, T, R)``: ``out[j] = a[:, j*KB:(j+1)*KB] @ B[j]`` (``a``'s missing columns = 0)."""
    T, K = a.shape
    NB, KB, R = B.shape
    out = torch.empty(NB, T, R, dtype=out_dtype, device=a.device)
    if T == 0 or R == 0:
        return out
    st = _static(a.dtype)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(R, meta["BLOCK_R"]),  # noqa
                         NB)
    _blast_block_gemm_kernel[grid](
        a, B, out, T, K, KB, R, _t_bucket(T),
        a.stride(0), B.stride(0), B.stride(1), B.stride(2), out.stride(0), out.stride(1),
        ACC=st["ACC"], DOT_FP32=st["DOT_FP32"], PRECISION=st["PRECISION"])
    return out


def _mix_gemm(z: Tensor, S: Tensor, U: Tensor, bias: Optional[Tensor], M: int,
              out_dtype: torch.dtype) -> Tensor:
    """``(T, M)``: ``y[:, i*P:(i+1)*P] = (sum_j S[i, j] * z[j]) @ U[i].T`` (+ bias), cut at M."""
    NJ, T, R = z.shape
    b1, P, _ = U.shape
    y = torch.empty(T, M, dtype=out_dtype, device=z.device)
    if T == 0:
        return y
    st = _static(U.dtype)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(P, meta["BLOCK_P"]),  # noqa
                         b1)
    _blast_mix_gemm_kernel[grid](
        z, S, U, bias if bias is not None else U, y, T, M, P, R, _t_bucket(T),
        z.stride(0), z.stride(1), S.stride(0), S.stride(1), S.stride(2),
        U.stride(0), U.stride(1), U.stride(2), y.stride(0),
        NJ=NJ, UNROLL_J=NJ <= _UNROLL_MAX_J, HAS_BIAS=bias is not None, **st)
    return y


def _mix(z: Tensor, S: Tensor) -> Tensor:
    """``(NI, T, R)``: ``out[i] = sum_j S[i, j] * z[j]`` in ``z``'s dtype (fp32 accumulate)."""
    NJ, T, R = z.shape
    NI = S.shape[0]
    out = torch.empty(NI, T, R, dtype=z.dtype, device=z.device)
    if T == 0 or R == 0:
        return out
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(R, meta["BLOCK_R"]),  # noqa
                         NI)
    _blast_mix_kernel[grid](z, S, out, T, R, NJ, _t_bucket(T),
                            z.stride(0), z.stride(1), S.stride(0), S.stride(1), S.stride(2),
                            out.stride(0), out.stride(1),
                            ACC=tl.float64 if z.dtype == torch.float64 else tl.float32)
    return out


def blast_forward_triton(x: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor],
                         out_features: int) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` the BLAST matrix of ``(U, S, V)``, cut to
    ``(out_features, n)``.

    ``x`` is 2-D ``(T, n)`` with ``n <= b2*q`` (the padding columns are masked inside the
    kernel, ``x`` is never copied padded); returns ``(T, out_features)`` in ``x.dtype``. ``U``,
    ``S``, ``V`` and ``bias`` are cast to ``x.dtype`` here. Two launches: the block GEMM
    ``z = x V`` (``z`` in ``x.dtype``) and the fused mix + U-GEMM + bias (module docstring).
    The arguments are those ``ops.check_blast_args`` accepted, with ``x`` 2-D."""
    x = _rowmajor(x)
    dt = x.dtype
    U, S, V = (t.to(dt).contiguous() for t in (U, S, V))
    b = bias.to(dt).contiguous() if bias is not None else None
    z = _block_gemm(x, V, dt)                                  # (b2, T, r)
    return _mix_gemm(z, S, U, b, out_features, dt)             # (T, m)


def blast_backward_triton(dy: Tensor, x: Tensor, U: Tensor, S: Tensor, V: Tensor,
                          bias: Optional[Tensor], out_features: int,
                          needs_input_grad: Sequence[bool] = (True,) * 5):
    """``(dx, dU, dS, dV, dbias)`` of ``blast_forward_triton``; ``None`` for grads not needed.

    An autograd formula built from the forward kernels (intermediates in ``x.dtype``):

    - ``dw = stage1(dy, U)``: ``dw[i] = dy[i] @ U[i]``, the block GEMM kernel (``U``'s padding
      rows beyond ``out_features`` masked like ``V``'s in the forward);
    - ``dx`` = the fused mix + GEMM kernel with the transposed factors: ``W.T`` has blocks
      ``V[j] diag(S[i, j]) U[i].T``, so ``U' = V``, ``S' = S.transpose(0, 1)`` (a strided
      view, no copy), input ``dw``, cut to ``n`` columns;
    - ``z = stage1(x, V)`` (recomputed, not saved), ``w = mix(S, z)`` and
      ``dz = mix(S.T, dw)`` by ``_blast_mix_kernel``;
    - weight grads with torch ``bmm`` on those intermediates: ``dU[i] = dy[i].T @ w[i]``,
      ``dV[j] = x[j].T @ dz[j]``, ``dS[i, j, r] = sum_t dw[i, t, r] z[j, t, r]``; the padding
      rows of ``dU`` / ``dV`` come out 0;
    - ``dbias = dy.sum(0)`` (fp32 accumulate), computed when its flag is set even if ``bias``
      is None (ops.py passes None and decides).

    ``needs_input_grad`` is ``(x, U, S, V, bias, ...)`` (extra trailing flags, e.g. for
    ``out_features``, are ignored). Grads come back in the dtypes of ``x``, ``U``, ``S``,
    ``V`` and ``bias`` (``dy``'s dtype when ``bias`` is None). The arguments are those the
    ops accepted (``x`` and ``dy`` 2-D, ``dy`` ``(T, out_features)``)."""
    T, n = x.shape
    if len(needs_input_grad) < 5:
        raise ValueError(f"blast triton: needs_input_grad must have 5 flags (x, U, S, V, bias), "
                         f"got {needs_input_grad!r}")
    need_x, need_U, need_S, need_V, need_b = (bool(f) for f in needs_input_grad[:5])
    b1, p, r = U.shape
    b2, q, _ = V.shape
    dt = x.dtype
    x = _rowmajor(x)
    dyc = _rowmajor(dy.to(dt))
    Uc, Sc, Vc = (t.to(dt).contiguous() for t in (U, S, V))

    dx = dU = dS = dV = db = None
    dw = _block_gemm(dyc, Uc, dt) if (need_x or need_S or need_V) else None   # (b1, T, r)
    z = _block_gemm(x, Vc, dt) if (need_U or need_S) else None                # (b2, T, r)
    if need_x:
        dx = _mix_gemm(dw, Sc.transpose(0, 1), Vc, None, n, dt)                # (T, n)
    if need_U:
        w = _mix(z, Sc)                                                        # (b1, T, r)
        dU = torch.bmm(split_blocks(dyc, b1, p).transpose(1, 2), w).to(U.dtype)
    if need_V:
        dz = _mix(dw, Sc.transpose(0, 1))                                      # (b2, T, r)
        dV = torch.bmm(split_blocks(x, b2, q).transpose(1, 2), dz).to(V.dtype)
    if need_S:
        # per rank slice: (b1, T) @ (T, b2)
        dS = torch.bmm(dw.permute(2, 0, 1), z.permute(2, 1, 0)).permute(1, 2, 0)
        dS = dS.to(S.dtype).contiguous()
    if need_b:
        out = bias.dtype if bias is not None else dy.dtype
        db = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32)
        db = db.to(out)
    return dx, dU, dS, dV, db


# ----------------------------------------------------------------------------- registration
# The CUDA kernels of ``structfx::blast_linear`` / ``blast_linear_backward``: registered when
# this module is imported (kernels/ops.py registers a stand-in that imports it on the first
# CUDA call). Called directly they also run on CPU tensors under TRITON_INTERPRET=1 (tests).
@torch.library.register_kernel("structfx::blast_linear", "cuda")
def blast_linear_cuda(x: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor],
                      out_features: int) -> Tensor:
    ops.check_blast_args(x, U, S, V, bias, out_features)
    y = blast_forward_triton(ops.tokens_2d(x), U, S, V, bias, out_features)
    return y.reshape(*x.shape[:-1], out_features)


@torch.library.register_kernel("structfx::blast_linear_backward", "cuda")
def blast_linear_backward_cuda(dy: Tensor, x: Tensor, U: Tensor, S: Tensor, V: Tensor,
                               out_features: int, needs: Sequence[bool]) -> tuple[Tensor, ...]:
    ops.check_backward_args("blast_linear_backward", dy, x, out_features, needs, 5)
    dx, *rest = blast_backward_triton(ops.tokens_2d(dy), ops.tokens_2d(x), U, S, V, None,
                                      out_features, needs)
    return ops.grads_out((None if dx is None else dx.reshape(x.shape), *rest), dy)
