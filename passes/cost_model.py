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

``CostModel(profile, measure=True)`` replaces the predicted times by timings of the real ops on
the current device (FLOPs and bytes stay the model's).
"""
from __future__ import annotations

import functools
import glob
import itertools
import math
import re
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..kernels import ops as _ops  # registers torch.ops.structfx.*; the FLOP formulas
from ..kernels import ss1_hash, ss1_torch
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

    def describe(self) -> str:
        if self.structure == "ss1":
            return f"ss1 c={self.compression}"
        if self.structure == "blast":
            b1, b2 = self.blocks
            if (b1, b2) == (1, 1):
                return f"lowrank r={self.rank}"
            return f"blast b={b1 if b1 == b2 else f'{b1}x{b2}'} r={self.rank}"
        return self.structure


@dataclass(frozen=True)
class DeviceProfile:
    """What the roofline needs to know about a device.

    ``peak_flops`` maps dtype names (``"bfloat16"``, ``"float32"``, ...) to FLOP/s of large
    dense GEMMs; ``bandwidth`` is main-memory bytes/s; ``kernel_overhead_s`` the fixed cost of
    one kernel launch (GPU) or one eager op (CPU); ``call_overhead_s`` the fixed host cost of one
    structfx op call on top of its kernels (its Python dispatch and argument checks: real on
    CPU, hidden on GPU by CUDA graphs / compiled launches, so 0 in the table). ``gemm_knee`` /
    ``gemm_floor`` shape the small-GEMM efficiency (module docstring); ``vector_flops`` is the
    rate of work done off the tensor cores (BLAST's mixing on CUDA).
    """

    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    kernel_overhead_s: float
    kind: str = "cuda"                  # "cuda" | "cpu": picks which implementation is modelled
    call_overhead_s: float = 0.0
    gemm_knee: int = 128                # tensor-core tiles are 64-128 wide
    gemm_floor: float = 0.0
    vector_flops: float = 0.0           # FLOP/s off the tensor cores (fp32 CUDA cores)
    gemm_eff_rule: str = "product"      # "product" of per-dimension factors, or "min" (CPU)


# Datasheet figures (dense, no sparsity; "float32" is TF32 on tensor cores). Real GEMMs reach
# 60-80% of them; as the model compares structures on one device, the ratios are what matter.
# Launch overhead: the gap between back-to-back kernels in a CUDA graph / compiled program.
_GPU_LAUNCH_S = 2e-6


def _gpu(name: str, half: float, tf32: float, fp64: float, bandwidth: float,
         cuda_cores: float) -> DeviceProfile:
    return DeviceProfile(name, {"bfloat16": half, "float16": half, "float32": tf32,
                                "float64": fp64}, bandwidth, _GPU_LAUNCH_S,
                         vector_flops=cuda_cores)


DEVICE_TABLE: dict[str, DeviceProfile] = {p.name: p for p in (
    #    name         bf16/fp16  tf32     fp64     memory B/s  fp32 CUDA cores
    _gpu("H100 SXM",  989e12,    495e12,  67e12,   3.35e12,    67e12),
    _gpu("H200",      989e12,    495e12,  67e12,   4.8e12,     67e12),
    _gpu("A100 80GB", 312e12,    156e12,  19.5e12, 2.039e12,   19.5e12),
    _gpu("L4",        121e12,    60e12,   0.49e12, 300e9,      30.3e12),
    # A10G (AWS) is a cut-down A10; NVIDIA publishes less for it, these are the usual figures.
    _gpu("A10G",      70e12,     35e12,   0.98e12, 600e9,      31.2e12),
    _gpu("RTX 4090",  165e12,    82.6e12, 1.29e12, 1008e9,     82.6e12),
)}
# Words of torch.cuda.get_device_name() -> table entry (PCIe / NVL parts are slower than the
# SXM figures; close enough to rank structures).
_NAME_KEYS = (("h200", "H200"), ("h100", "H100 SXM"), ("a100", "A100 80GB"),
              ("a10g", "A10G"), ("4090", "RTX 4090"), ("l4", "L4"))

# CPU constants, fitted on a 2-vCPU AMD EPYC (Zen 3) VM against F.linear vs blast_linear
# timings (fp32, n = m = 1024 / 2048, T = 1..256, b = 1..16 at 50% params; weights cold; mean
# |log(predicted / measured speedup)| 0.09), then refitted with small layers added (256..3072
# wide, r = 62..512, T = 64..512: mean error 0.30 -> 0.09): a CPU GEMM runs at the pace of
# its smallest dimension (BLAST's r ~ 60 stages are what lose at 256 wide), reaching full
# speed at ~128 and never dropping below ~15% (vector units busy on the weight stream); bmm
# at small T streams its weights at about half the bandwidth F.linear's GEMV path reaches
# (measured 11 vs 17 GB/s at T = 1).
_CPU_KNEE, _CPU_FLOOR = 128, 0.15
_CPU_BMM_STREAM = 0.5


def _best_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=1)
def cpu_profile() -> DeviceProfile:
    """Measure this CPU once per process (~0.5 s): best of a few runs, since a shared machine
    only ever slows a run down."""
    peak = {}
    # Half-precision matmuls fall onto slow paths on CPUs without bf16/fp16 units (100x here):
    # measure them small so this stays fast.
    for dtype, size in ((torch.float32, 768), (torch.float64, 512),
                        (torch.bfloat16, 192), (torch.float16, 192)):
        a = torch.randn(size, size, dtype=dtype)
        peak[str(dtype).removeprefix("torch.")] = 2 * size ** 3 / _best_time(lambda: a @ a, 3)
    src = torch.empty(1 << 23)          # 32 MB each way: past the caches
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / _best_time(lambda: dst.copy_(src), 4)
    one = torch.ones(1)
    overhead = _best_time(lambda: torch.add(one, one), 200)
    # One tiny structfx op: everything but its 3 eager ops is the per-call host cost. (The
    # first op call imports torch._dynamo, ~2 s, once per process.)
    x, U, S, V = torch.ones(1, 8), torch.ones(1, 8, 1), torch.ones(1, 1, 1), torch.ones(1, 8, 1)
    call = _best_time(lambda: torch.ops.structfx.blast_linear(x, U, S, V, None, 8), 50)
    call -= 3 * overhead
    return DeviceProfile("cpu", peak, bandwidth, overhead, kind="cpu",
                         call_overhead_s=max(call, 0.0), gemm_knee=_CPU_KNEE,
                         gemm_floor=_CPU_FLOOR, gemm_eff_rule="min")


def _last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs), 8 MB where it can't be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError, IndexError):
            pass
    return max(sizes, default=8 << 20)


def _match_table(name: str) -> Optional[DeviceProfile]:
    for entry in DEVICE_TABLE:
        if entry.lower() == name.lower():
            return DEVICE_TABLE[entry]
    # Whole words only: "L4" must not match "L40S".
    words = set(re.split(r"[\s\-_]+", name.lower()))
    for key, entry in _NAME_KEYS:
        if key in words:
            return DEVICE_TABLE[entry]
    return None


def device_profile(device: Union[str, torch.device, None] = None) -> DeviceProfile:
    """Profile for a device: a table name (``"H100 SXM"``, ``"h100"``, a CUDA device name),
    ``"cpu"``, ``"cuda[:i]"`` / a ``torch.device``, or None for the current device (CUDA if
    available, matched to the table by name; else this CPU, measured)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, str):
        found = _match_table(device)
        if found is not None:
            return found
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; known: 'cpu', 'cuda', "
                             f"{sorted(DEVICE_TABLE)}") from None
    if device.type == "cpu":
        return cpu_profile()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = _match_table(name)
        if found is None:
            raise ValueError(f"no cost profile for GPU {name!r}; name the closest one with "
                             f"Config(device=...) from {sorted(DEVICE_TABLE)}, or use "
                             f"Config(measure=True) to time the candidates")
        return found
    raise ValueError(f"no cost profile for device type {device.type!r}")


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
                 measure: bool = False):
        name = str(dtype).removeprefix("torch.")
        if name not in profile.peak_flops:
            raise ValueError(f"device profile {profile.name!r} has no peak FLOP/s for {name}; "
                             f"it has {sorted(profile.peak_flops)}")
        self.profile, self.dtype, self.measure = profile, dtype, measure
        self.peak = profile.peak_flops[name]
        self.itemsize = dtype.itemsize
        self._dense_time: dict[tuple[int, int, int], float] = {}

    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32) -> "CostModel":
        return cls(device_profile(config.device), dtype, measure=config.measure)

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
        return self._measured(c, m, n, tokens) if self.measure else c

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
                               stream=_CPU_BMM_STREAM)]
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
                                   stream=_CPU_BMM_STREAM))
            if b1 > 1:
                kernels.append(_Kernel(0, 2 * y))   # (b1, T, p) -> (T, m): a transposing copy
        c = self._candidate(kernels, structure="blast", blocks=(b1, b2), rank=r,
                            compression=None, params=blast_params(m, n, blocks, r),
                            flops=_ops.blast_flops((T, n), (b1, p, r), (b1, b2, r), (b2, q, r)))
        return self._measured(c, m, n, tokens) if self.measure else c

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
                        ops=g, stream=_CPU_BMM_STREAM),
                _Kernel(0, 4 * y, ops=2 * g),             # (g, T, BN) -> (T, g*BN) -> into y
            ]
        c_ = self._candidate(kernels, structure="ss1", blocks=None, rank=None, compression=c,
                             params=N * K_red, flops=flops)
        return self._measured(c_, m, n, tokens, block_k, block_n) if self.measure else c_

    # ------------------------------------------------------------------ the grid
    def candidates(self, m: int, n: int, tokens: int, config) -> list[Candidate]:
        """Dense first, then the structures ``config`` asks for: BLAST ``blocks x
        rank_fractions`` (``"blast"``), ranks at blocks (1, 1) (``"lowrank"``), SS1
        ``compressions`` (``"ss1"``), or all of them (``"auto"``). Structures that don't save
        parameters are dropped, and, unless ``config.force``, those predicted (or measured) to be
        no faster than dense."""
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
            if config.force or cand.time_s < dense.time_s:
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
            copies = max(1, min(64, -(-2 * _last_level_cache_bytes() // size)))
        weights = itertools.cycle([[rand(*s) for s in shapes] for _ in range(copies)])
        t = _median_time(lambda: op(x, *next(weights)), dev)
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


def _median_time(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        # do_bench flushes L2 between runs: small structured weights would otherwise stay
        # cached and overstate the gain at decode sizes.
        return triton.testing.do_bench(fn, return_mode="median") * 1e-3
    fn()                                        # warm-up: caches, allocator, oneDNN primitives
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    # A few runs, fewer when each is long (a big layer at a big token count takes seconds).
    times = []
    for _ in range(max(3, min(15, int(0.2 / max(first, 1e-6))))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
