"""What the cost model knows about a device: ``DeviceProfile``, the datasheet table of common
GPUs (``DEVICE_TABLE``), this CPU measured once per process (``cpu_profile``), and the lookup
from a name or a ``torch.device`` (``device_profile``). The roofline that uses them is
``passes/cost_model.py``.
"""
from __future__ import annotations

import functools
import glob
import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..kernels import ops as _ops  # noqa: F401  (registers torch.ops.structfx.*, timed below)
from ..timing import time_fn


def _best(fn: Callable[[], object], reps: int) -> float:
    """Fastest of ``reps`` runs after one warm-up: a shared machine only ever slows a run down."""
    return time_fn(fn, repeats=reps, warmup=1, best=True)


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
CPU_KNEE, CPU_FLOOR = 128, 0.15
CPU_BMM_STREAM = 0.5


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
        peak[str(dtype).removeprefix("torch.")] = 2 * size ** 3 / _best(lambda: a @ a, 3)
    src = torch.empty(1 << 23)          # 32 MB each way: past the caches
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / _best(lambda: dst.copy_(src), 4)
    one = torch.ones(1)
    overhead = _best(lambda: torch.add(one, one), 200)
    # One tiny structfx op: everything but its 3 eager ops is the per-call host cost. (The
    # first op call imports torch._dynamo, ~2 s, once per process.)
    x, U, S, V = torch.ones(1, 8), torch.ones(1, 8, 1), torch.ones(1, 1, 1), torch.ones(1, 8, 1)
    call = _best(lambda: torch.ops.structfx.blast_linear(x, U, S, V, None, 8), 50)
    call -= 3 * overhead
    return DeviceProfile("cpu", peak, bandwidth, overhead, kind="cpu",
                         call_overhead_s=max(call, 0.0), gemm_knee=CPU_KNEE,
                         gemm_floor=CPU_FLOOR, gemm_eff_rule="min")


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs), 8 MB where it can't be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError, IndexError):
            pass
    return max(sizes, default=8 << 20)


def match_table(name: str) -> Optional[DeviceProfile]:
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
        found = match_table(device)
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
        found = match_table(name)
        if found is None:
            raise ValueError(f"no cost profile for GPU {name!r}; name the closest one with "
                             f"Config(device=...) from {sorted(DEVICE_TABLE)}, or use "
                             f"Config(time_candidates=True) to time the candidates")
        return found
    raise ValueError(f"no cost profile for device type {device.type!r}")
