"""The SS1 structured hash (docs/design.md, "SS1"): which parameter of ``P`` each entry of ``W`` reads.

Every SS1 implementation in structfx (reference, CPU path, Triton kernels, ONNX function,
projection) derives its indices from the functions here, so they agree by construction.

Names follow the spec: ``W`` is ``(K, N)`` (in_features, out_features), ``P`` is
``(N, K_red)``; ``c`` is the compression, ``BK`` / ``BN`` the structure block sizes.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

VEC = 8
DEFAULT_BLOCK_K = 32
DEFAULT_BLOCK_N = 64


# Bumped whenever the hash (so which weights a given P and seed stand for) changes: a factor
# cache keyed on the seed must include it, or factors projected under the old hash would be
# read under the new one. 2: odd R0..R3.
HASH_VERSION = 2


def hash_coeffs(seed: int) -> tuple[int, int, int, int]:
    """``(R0, R1, R2, R3)`` for a layer's seed: odd ints ``2k + 1 < 2**15`` (runtime kernel args).

    Odd, as the SS1 authors draw them: the rotation between the ``c`` chunks sharing one
    parameter chunk differs by ``VEC * R0 * (u - u') mod BK``, so an even ``R0`` can give two
    tied chunks the same rotation, i.e. identical rows of ``W`` (26% of seeds at c = 2 with
    any-parity constants). With an odd ``R0`` they are distinct whenever ``c <= BK / VEC``."""
    gen = torch.Generator().manual_seed(int(seed))
    k = torch.randint(0, 1 << 14, (4,), generator=gen)
    return tuple(int(2 * v + 1) for v in k)


def distinct_rotations(c: int, seed: int, block_k: int = DEFAULT_BLOCK_K) -> bool:
    """Whether the ``c`` chunks sharing one parameter chunk all get distinct rotations (no two
    identical rows of ``W``). With ``L = block_k / VEC`` rotations available and an odd ``R0``
    this holds for every seed when ``L`` is a power of two (the default 32: 4) and ``c <= L``;
    beyond ``c = L`` chunks ``u`` and ``u + L`` necessarily repeat."""
    L = block_k // VEC
    R0 = hash_coeffs(seed)[0]
    return all((R0 * d) % L for d in range(1, c))


def reduced_k(K: int, c: int, block_k: int = DEFAULT_BLOCK_K) -> int:
    """``K_red = ceil(K / (c * BK)) * BK``: the width of ``P``."""
    return -(-K // (c * block_k)) * block_k


def check_config(K: int, N: int, c: int, block_k: int, block_n: int) -> None:
    """Raise a ValueError naming the problem if an SS1 layer config is unusable."""
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ValueError(f"SS1 compression must be an integer >= 1, got {c!r}")
    if K < 1 or N < 1:
        raise ValueError(f"SS1 needs in_features, out_features >= 1, got K={K}, N={N}")
    if block_k < VEC or block_k % VEC:
        raise ValueError(f"SS1 block_k must be a positive multiple of {VEC}, got {block_k}")
    if block_n < 1:
        raise ValueError(f"SS1 block_n must be >= 1, got {block_n}")


# Caches bounded by bytes, not by count. ``weight_index`` is int64 (K, N), twice a layer's
# fp32 weight bytes, and only the projection reads it: 64 cached entries held ~150 MB after
# estimating MiniLM's SS1 candidates and would hold gigabytes for a large model (every layer
# has its own seed, so entries are reused only between a layer's estimate and its final,
# far apart). ``sketch_index`` is 1/64 of the entries and every SS1 forward on the CPU path
# reads it: 128 MiB keeps those of 4 GB of SS1 weights.
CACHE_BYTES = 128 << 20
WEIGHT_INDEX_BYTES = 16 << 20


class _IndexCache:
    """Least-recently-used cache of index tensors, at most ``limit`` bytes (the newest entry is
    always kept, however large)."""

    def __init__(self, build, limit: int = CACHE_BYTES):
        self.build, self.limit = build, limit
        self.entries: OrderedDict = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.__doc__ = build.__doc__

    def __call__(self, *key) -> torch.Tensor:
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                return hit
        value = self.build(*key)
        with self.lock:
            if key not in self.entries:
                self.entries[key] = value
                self.bytes += value.numel() * value.element_size()
            while len(self.entries) > 1 and self.bytes > self.limit:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
            return self.entries.get(key, value)

    def cache_clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.bytes = 0


def rotation(t, u, j, coeffs: tuple[int, int, int, int], block_k: int):
    """``s(t, u, j)``: the cyclic rotation of chunk ``i = t*c + u`` in column block ``j``.

    Works on ints and on integer tensors (broadcasting)."""
    R0, R1, R2, R3 = coeffs
    return (VEC * (R3 + R2 * j + R1 * (t + 1) + R0 * (u + 1))) % block_k


def _weight_index_build(K: int, N: int, c: int, seed: int, block_k: int, block_n: int) -> torch.Tensor:
    K_red = reduced_k(K, c, block_k)
    coeffs = hash_coeffs(seed)
    k = torch.arange(K).view(K, 1)
    n = torch.arange(N).view(1, N)
    i, v = k // block_k, k % block_k
    t, u = i // c, i % c
    s = rotation(t, u, n // block_n, coeffs, block_k)
    col = t * block_k + (v - s) % block_k
    return n * K_red + col  # (K, N), flat index into P (N, K_red)


_weight_index = _IndexCache(_weight_index_build, WEIGHT_INDEX_BYTES)


def weight_index(K: int, N: int, c: int, seed: int, block_k: int = DEFAULT_BLOCK_K,
                 block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """``(K, N)`` int64 tensor: ``W[k, n] = P.flatten()[index[k, n]]``. Cached; do not modify."""
    check_config(K, N, c, block_k, block_n)
    return _weight_index(K, N, c, int(seed), block_k, block_n)


def dense_weight(P: torch.Tensor, K: int, c: int, seed: int, block_k: int = DEFAULT_BLOCK_K,
                 block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """Materialize ``W`` ``(K, N)`` from ``P`` ``(N, K_red)``: the plain reference of the hash."""
    N = P.shape[0]
    idx = weight_index(K, N, c, seed, block_k, block_n).to(P.device)
    return P.reshape(-1)[idx]


def _sketch_index_build(K: int, N: int, c: int, seed: int, block_k: int, block_n: int) -> torch.Tensor:
    K_red = reduced_k(K, c, block_k)
    coeffs = hash_coeffs(seed)
    n_blocks = -(-N // block_n)
    j = torch.arange(n_blocks).view(n_blocks, 1, 1)
    u = torch.arange(c).view(1, c, 1)
    col = torch.arange(K_red).view(1, 1, K_red)
    t, w = col // block_k, col % block_k
    s = rotation(t, u, j, coeffs, block_k)
    k = (t * c + u) * block_k + (w + s) % block_k
    return torch.where(k < K, k, K)  # K points at a zero column appended to x


_sketch_index = _IndexCache(_sketch_index_build)


def sketch_index(K: int, N: int, c: int, seed: int, block_k: int = DEFAULT_BLOCK_K,
                 block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """``(n_blocks, c, K_red)`` int64: ``sketch_j(x)[:, col] = sum_u x_pad[:, index[j, u, col]]``.

    ``x_pad`` is ``x`` with one zero column appended (index ``K``) standing for every padded
    row of ``W``. Cached; do not modify."""
    check_config(K, N, c, block_k, block_n)
    return _sketch_index(K, N, c, int(seed), block_k, block_n)
