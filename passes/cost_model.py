"""Cost pass: what each structure would cost one Linear site, on one device.

A roofline per kernel, summed over the kernels an op runs (they run one after the other, so
their times add; for one kernel this is the plain ``max(flops / peak, bytes / bandwidth)``):

    time      = call_overhead + sum_k [ max(compute_k, memory_k) + ops_k * kernel_overhead ]
    compute_k = flops_k / (peak[dtype] * eff_k) + vector_flops_k / vector_peak
    memory_k  = bytes_k / (bandwidth * stream_k)

- ``eff_k``: small GEMMs run below peak (tiles padded, tensor cores / SIMD lanes idle), so tiny
  blocks look as slow as they are: the product of ``clamp(d / knee, floor, 1)`` over the GEMM
  dimensions (GPU), or that factor of the smallest dimension alone (CPU).
- ``bytes_k``: weights, activations and every intermediate the op writes and reads back
  (BLAST's ``z``: ``b*r`` values per token; SS1's re-read input): the traffic that makes a
  structured layer memory bound at large T (docs/design.md, "Cost model").
- ``stream_k``: the fraction of the bandwidth the kernel's access pattern reaches (CPU bmm).
- ``ops_k * kernel_overhead``: launches (GPU) or eager ops (CPU); at decode they decide.
- ``call_overhead``: the structfx op's host-side dispatch (CPU; hidden by CUDA graphs on GPU).

What each op's kernels compute and move follows its implementation: ``kernels/blast_triton.py``
(CUDA: stage 1, then mix + stage 3 fused), ``kernels/blast_torch.py`` (CPU: 2 bmm + a mixing
loop), the fused SS1 Triton kernel and ``kernels/ss1_torch.py`` (CPU: gather + bmm).

``CostModel(profile, time_candidates=True)`` replaces the predicted times by timings of the real
ops on the current device (FLOPs and bytes stay the model's).

The device figures (``DeviceProfile``, the GPU table, the CPU microbenchmark) are in
``passes/device.py``; which candidates select is offered (``Config.force``) is decided in
``passes/select.py``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels import ops as _ops  # registers torch.ops.structfx.*; the FLOP formulas
from ..kernels import ss1_hash, ss1_torch
from ..layers import BlastLinear, SS1Linear
from ..timing import time_fn
from .device import (CPU_BMM_STREAM, DEVICE_TABLE, DeviceProfile,  # noqa: F401  (re-exported)
                     cpu_profile, device_profile, last_level_cache_bytes)
from .factorize_blast import blast_rank_for_params


@dataclass(frozen=True)
class Candidate:
    """One way to run a Linear site: its exact size and work, and its (predicted) time."""

    structure: str                      # "dense" | "blast" | "ss1" (low rank: blast, blocks (1, 1))
    blocks: Optional[tuple[int, int]]   # BLAST (b1, b2)
    rank: Optional[int]                 # BLAST r
    compression: Optional[int]          # SS1 c
    params: int                         # weight parameters as stored (bias excluded)
    flops: int                          # forward FLOPs at the site's token count
    bytes: int                          # bytes moved: weights + activations + intermediates
    time_s: float                       # predicted (or measured) seconds for one forward
    measured: bool = False

    @property
    def kind(self) -> str:
        """``"dense"``, ``"blast"``, ``"lowrank"`` (BLAST at blocks (1, 1)) or ``"ss1"``."""
        return structure_label(self.structure, self.blocks, self.rank, self.compression)[0]

    @property
    def settings(self) -> str:
        """``"b=4 r=94"``, ``"r=94"`` (low rank), ``"c=2"`` (SS1), ``""`` (dense)."""
        return structure_label(self.structure, self.blocks, self.rank, self.compression)[1]

    def describe(self) -> str:
        """``"blast b=4 r=94"``, ``"lowrank r=94"``, ``"ss1 c=2"`` or ``"dense"``."""
        return f"{self.kind} {self.settings}".rstrip()


def structure_label(structure: str, blocks: Optional[tuple[int, int]] = None,
                    rank: Optional[int] = None,
                    compression: Optional[int] = None) -> tuple[str, str]:
    """``(kind, settings)`` naming a structure as the report, the progress bars and the cache
    keys show it: ``("blast", "b=4 r=94")``, ``("blast", "b=2x4 r=8")``, ``("lowrank",
    "r=94")`` (BLAST at blocks (1, 1)), ``("ss1", "c=2")``, ``("dense", "")``."""
    if structure == "blast":
        b1, b2 = blocks
        if (b1, b2) == (1, 1):
            return "lowrank", f"r={rank}"
        return "blast", f"b={b1 if b1 == b2 else f'{b1}x{b2}'} r={rank}"
    if structure == "ss1":
        return "ss1", f"c={compression}"
    return structure, ""


def describe_layer(layer) -> str:
    """``Candidate.describe()`` of a built ``BlastLinear`` / ``SS1Linear`` (``"dense"`` for
    anything else): the same label for the module as for the candidate it was built from."""
    if isinstance(layer, BlastLinear):
        kind, settings = structure_label("blast", tuple(layer.blocks), layer.rank)
    elif isinstance(layer, SS1Linear):
        kind, settings = structure_label("ss1", compression=layer.compression)
    else:
        kind, settings = structure_label("dense")
    return f"{kind} {settings}".rstrip()


@dataclass(frozen=True)
class _Kernel:
    """One kernel (GPU) or eager op (CPU); its roofline is taken on its own."""

    flops: float = 0.0
    bytes: float = 0.0
    eff: float = 1.0      # fraction of peak its GEMM shape reaches
    ops: int = 1          # launches / eager ops it stands for
    vector: float = 0.0   # FLOPs done off the tensor cores, at profile.vector_flops
    stream: float = 1.0   # fraction of the bandwidth its access pattern reaches


class CostModel:
    """Candidates for one Linear site (``m`` = out_features, ``n`` = in_features, ``tokens``
    rows), with exact params / FLOPs and a roofline time (module docstring)."""

    def __init__(self, profile: DeviceProfile, dtype: torch.dtype = torch.float32,
                 time_candidates: bool = False):
        name = str(dtype).removeprefix("torch.")
        if name not in profile.peak_flops:
            raise ValueError(f"device profile {profile.name!r} has no peak FLOP/s for {name}; "
                             f"it has {sorted(profile.peak_flops)}")
        self.profile, self.dtype, self.time_candidates = profile, dtype, time_candidates
        self.peak = profile.peak_flops[name]
        self.itemsize = dtype.itemsize
        self._dense_time: dict[tuple[int, int, int], float] = {}

    # ------------------------------------------------------------------ the roofline
    def _eff(self, *dims: int) -> float:
        p = self.profile
        if p.gemm_eff_rule == "min":
            return min(1.0, max(p.gemm_floor, min(dims) / p.gemm_knee))
        out = 1.0
        for d in dims:
            out *= min(1.0, max(p.gemm_floor, d / p.gemm_knee))
        return out

    def _time(self, kernels: list[_Kernel], structured: bool) -> float:
        p = self.profile
        t = p.call_overhead_s if structured else 0.0
        for k in kernels:
            memory = k.bytes / (p.bandwidth * k.stream)
            compute = k.flops / (self.peak * k.eff)
            compute += k.vector / (p.vector_flops or self.peak)
            t += max(compute, memory) + k.ops * p.kernel_overhead_s
        return t

    def _candidate(self, kernels: list[_Kernel], **fields) -> Candidate:
        moved = int(sum(k.bytes for k in kernels))
        return Candidate(**fields, bytes=moved,
                         time_s=self._time(kernels, structured=fields["structure"] != "dense"))

    # ------------------------------------------------------------------ structures
    def dense(self, m: int, n: int, tokens: int) -> Candidate:
        """``F.linear``: one GEMM; the weight, x and y each cross memory once."""
        T, e = tokens, self.itemsize
        kernels = [_Kernel(2 * T * m * n, e * (m * n + T * n + T * m), self._eff(T, m, n))]
        c = self._candidate(kernels, structure="dense", blocks=None, rank=None, compression=None,
                            params=m * n, flops=2 * T * m * n)
        return self._measured(c, m, n, tokens) if self.time_candidates else c

    def blast(self, m: int, n: int, tokens: int, blocks: tuple[int, int], rank: int) -> Candidate:
        """BLAST with ``blocks = (b1, b2)`` and rank ``r``; ``(1, 1)`` is low rank."""
        (b1, b2), r, T, e = blocks, rank, tokens, self.itemsize
        p, q = -(-m // b1), -(-n // b2)             # padded block sizes, as BlastLinear stores
        x, y = e * T * n, e * T * m
        U, S, V = e * b1 * p * r, e * b1 * b2 * r, e * b2 * q * r
        z, w = e * T * b2 * r, e * T * b1 * r       # intermediates: b*r values per token each
        if self.profile.kind == "cuda":
            kernels = [
                # Stage 1 writes z to HBM: the intermediate docs/design.md, "Cost model" warns about.
                _Kernel(2 * T * b2 * q * r, x + V + z, self._eff(T, q, r)),
                # Mix fused into stage 3's prologue: z read back once, w never leaves the chip.
                # The mix runs on CUDA cores, and every p tile (~128 wide) redoes it.
                _Kernel(2 * T * b1 * p * r, z + S + U + y, self._eff(T, r, p),
                        vector=2 * T * b1 * b2 * r * -(-p // 128)),
            ]
        else:
            kernels = [_Kernel(2 * T * b2 * q * r, x + V + z, self._eff(T, q, r),
                               stream=CPU_BMM_STREAM)]
            if b2 == 1:
                # w = S * z: one broadcast multiply, z read and w written.
                kernels.append(_Kernel(0, S + z + w))
            else:
                # b2 addcmul_ passes over the (b1, T, r) accumulator w, each reading and writing
                # it plus one z slab: memory bound (a broadcasting elementwise op doesn't reach
                # copy speed even in cache), and each pass is ~3 eager ops (slice S, broadcast
                # view, addcmul_).
                slab = e * T * r
                kernels.append(_Kernel(0, S + slab + w, ops=3))
                kernels += [_Kernel(0, 2 * w + slab, ops=3)] * (b2 - 1)
            kernels.append(_Kernel(2 * T * b1 * p * r, w + U + e * T * b1 * p, self._eff(T, r, p),
                                   stream=CPU_BMM_STREAM))
            if b1 > 1:
                kernels.append(_Kernel(0, 2 * y))   # (b1, T, p) -> (T, m): a transposing copy
        c = self._candidate(kernels, structure="blast", blocks=(b1, b2), rank=r,
                            compression=None, params=blast_params(m, n, blocks, r),
                            flops=_ops.blast_flops((T, n), (b1, p, r), (b1, b2, r), (b2, q, r)))
        return self._measured(c, m, n, tokens) if self.time_candidates else c

    def ss1(self, m: int, n: int, tokens: int, compression: int, block_k: int = 32,
            block_n: int = 64) -> Candidate:
        """SS1 at compression ``c`` (``K = n`` inputs, ``N = m`` outputs)."""
        K, N, c, T, e = n, m, compression, tokens, self.itemsize
        K_red = ss1_hash.reduced_k(K, c, block_k)
        nb = -(-N // block_n)
        P, y = e * N * K_red, e * T * nb * block_n
        flops = _ops.ss1_flops((T, K), (N, K_red), block_n)  # GEMM + sketch additions
        if self.profile.kind == "cuda":
            # One fused kernel; every column block re-reads (and re-sketches) all of x.
            kernels = [_Kernel(flops, P + e * T * K * nb + e * T * N, self._eff(T, N, K_red))]
        else:
            g = len(ss1_torch._groups(T, nb, K_red))     # the CPU path's column-block groups
            sketch = e * T * nb * K_red                   # the gathered input, (T, nb, K_red)
            kernels = [
                _Kernel(0, 2 * e * T * K),                # x padded by a zero column
                # c gathers each write the sketch (reading as much of x); the c-1 adds read two
                # and write one.
                _Kernel(0, 2 * sketch, ops=g),
                *[_Kernel(0, 5 * sketch, ops=2 * g)] * (c - 1),
                # One bmm per group: sketch and P in, (g, T, BN) out.
                _Kernel(2 * T * nb * block_n * K_red, sketch + P + y, self._eff(T, block_n, K_red),
                        ops=g, stream=CPU_BMM_STREAM),
                _Kernel(0, 4 * y, ops=2 * g),             # (g, T, BN) -> (T, g*BN) -> into y
            ]
        c_ = self._candidate(kernels, structure="ss1", blocks=None, rank=None, compression=c,
                             params=N * K_red, flops=flops)
        return self._measured(c_, m, n, tokens, block_k, block_n) if self.time_candidates else c_

    # ------------------------------------------------------------------ the grid
    def candidates(self, m: int, n: int, tokens: int, config) -> list[Candidate]:
        """Dense first, then the structures ``config`` asks for: BLAST ``blocks x
        rank_fractions`` (``"blast"``), ranks at blocks (1, 1) (``"lowrank"``), SS1
        ``compressions`` (``"ss1"``), or all of them (``"auto"``), each priced (or timed).
        Structures that don't save parameters are dropped; which of the rest select is offered
        (``config.force``) is ``select.candidate_grid``'s business."""
        dense = self.dense(m, n, tokens)
        grid: list[tuple[int, int]] = []
        if config.structure in ("blast", "auto"):
            grid += [(b, b) for b in config.blocks if b <= min(m, n)]
        if config.structure in ("lowrank", "auto"):
            grid.append((1, 1))
        specs: list[tuple] = [("blast", blocks, blast_rank(m, n, blocks, rho))
                              for blocks in grid for rho in config.rank_fractions]
        if config.structure in ("ss1", "auto"):
            specs += [("ss1", c) for c in config.compressions]
        out = [dense]
        for spec in dict.fromkeys(specs):       # drop duplicates, keep the order
            # Check the size first: no point timing a structure that saves nothing.
            if spec[0] == "blast":
                if blast_params(m, n, spec[1], spec[2]) >= dense.params:
                    continue
                cand = self.blast(m, n, tokens, spec[1], spec[2])
            else:
                if m * ss1_hash.reduced_k(n, spec[1]) >= dense.params:
                    continue
                cand = self.ss1(m, n, tokens, spec[1])
            out.append(cand)
        return out

    # ------------------------------------------------------------------ measuring
    def _measured(self, cand: Candidate, m: int, n: int, tokens: int, block_k: int = 32,
                  block_n: int = 64) -> Candidate:
        """``cand`` with ``time_s`` timed on the current device, random non-zero factors."""
        if cand.structure == "dense" and (m, n, tokens) in self._dense_time:
            return replace(cand, time_s=self._dense_time[m, n, tokens], measured=True)
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gen = torch.Generator().manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(dev, self.dtype)

        x = rand(tokens, n)
        if cand.structure == "dense":
            shapes = [(m, n)]
            op = F.linear
        elif cand.structure == "blast":
            (b1, b2), r = cand.blocks, cand.rank
            shapes = [(b1, -(-m // b1), r), (b1, b2, r), (b2, -(-n // b2), r)]
            op = lambda x, U, S, V: torch.ops.structfx.blast_linear(x, U, S, V, None, m)  # noqa
        else:
            shapes = [(m, ss1_hash.reduced_k(n, cand.compression, block_k))]
            op = lambda x, P: torch.ops.structfx.ss1_linear(  # noqa: E731
                x, P, None, cand.compression, 0, block_k, block_n)
        # In a network each layer's weights come from memory, not from a cache a loop over one
        # layer keeps warm. CUDA: do_bench flushes L2. CPU: cycle through enough copies of the
        # weights to overflow the last-level cache (flushing it would also evict the
        # interpreter's own code and data, which a network keeps hot).
        copies = 1
        if dev.type == "cpu":
            size = sum(math.prod(s) for s in shapes) * self.itemsize
            copies = max(1, min(64, -(-2 * last_level_cache_bytes() // size)))
        weights = itertools.cycle([[rand(*s) for s in shapes] for _ in range(copies)])
        # Medians; on CPU a few runs, fewer when each is long (a big layer at a big token
        # count takes seconds): as many as fit in 0.2 s, 3 to 15, after two warm-up calls
        # (caches, allocator, oneDNN primitives).
        t = time_fn(lambda: op(x, *next(weights)), flush_l2=dev.type == "cuda", warmup=2,
                    budget_s=0.2, min_repeats=3, max_repeats=15)
        if cand.structure == "dense":
            self._dense_time[m, n, tokens] = t
        return replace(cand, time_s=t, measured=True)


def blast_rank(m: int, n: int, blocks: tuple[int, int], fraction: float) -> int:
    """``r = floor(rho m n / (m + n + b1 b2))``, at least 1 (docs/design.md, "BLAST")."""
    return blast_rank_for_params(m, n, blocks, fraction)


def blast_params(m: int, n: int, blocks: tuple[int, int], rank: int) -> int:
    """Parameters as ``BlastLinear`` stores them (``m``, ``n`` padded to the block grid)."""
    b1, b2 = blocks
    return rank * (b1 * -(-m // b1) + b2 * -(-n // b2) + b1 * b2)

