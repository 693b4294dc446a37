"""Argument helpers shared by the layers, the factorizers and the kernels (no torch, no triton)."""
from __future__ import annotations

import numbers
from typing import Union

Blocks = Union[int, tuple[int, int]]


def block_pair(blocks: Blocks) -> tuple[int, int]:
    """BLAST ``blocks`` as ``(b1, b2)``: ``b`` means ``(b, b)``. Any integral type (numpy ints
    too) is accepted; ``bool`` is not (``True`` is an int to Python, never a block count)."""
    def integral(b) -> bool:
        return isinstance(b, numbers.Integral) and not isinstance(b, bool)

    if integral(blocks):
        return int(blocks), int(blocks)
    if isinstance(blocks, (tuple, list)) and len(blocks) == 2 and all(map(integral, blocks)):
        return int(blocks[0]), int(blocks[1])
    raise ValueError(f"blocks must be an int or a pair of ints (b1, b2), got {blocks!r}")


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``): tile sizes and autotune buckets."""
    return 1 << max(0, int(n) - 1).bit_length()
