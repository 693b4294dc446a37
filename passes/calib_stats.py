"""Calibration statistics: what a data-aware pass needs from the rows a layer saw, streamed.

Every data-aware factorization (BLAST, low rank, SS1) and every estimate needs only two things
from a layer's input rows ``X``: the Gram ``X_fit^T X_fit`` of the fit rows (the objective) and
the held-out rows themselves (the output error the budget is allocated by). ``StatsRecorder``
builds both as batches stream past, so compress never holds a layer's full activation matrix:
per distinct input node it keeps an ``n x n`` Gram and the held-out eighth of the rows.

The one hold-out rule: every ``HOLDOUT_EVERY``-th row of the stream (by position, so held-out
rows are spread over the data, not taken from its end), at least one. ``split_calib`` applies
it to a row matrix, ``StatsRecorder`` to a stream; both give the same split.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .checks import calibration_problem, gram_limit, too_large

HOLDOUT_EVERY = 8  # every 8th calibration row (12.5%) is held out for ``output_error``
# Rows per Gram product: each is summed in the rows' dtype, the products in fp64.
_GEMM_ROWS = 1024
_FP32_SAFE = 1e15   # 1024 squares of this stay far below fp32's largest value


@dataclass(frozen=True, eq=False)
class CalibStats:
    """A layer's calibration rows, reduced to what the passes use."""

    gram: Tensor            # (n, n) float64: sum of x x^T over the fit rows
    count: int              # number of fit rows
    held: Tensor            # (N_held, n) the held-out rows, in the rows' dtype
    max_abs: float          # largest |x| over all rows (fit and held out)
    digest: str             # content hash of the rows, in stream order
    problem: Optional[str] = None   # why the rows can't drive a factorization (non-finite)

    @property
    def in_features(self) -> int:
        return self.gram.shape[0]

    @property
    def rows(self) -> int:
        """How many rows were recorded (fit and held out)."""
        return self.count + self.held.shape[0]

    def cov(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        """``X_fit^T X_fit / N_fit`` in ``dtype`` on ``device``."""
        return (self.gram / max(self.count, 1)).to(device=device, dtype=dtype)


def stats_bytes(in_features: int, max_rows: int, itemsize: int = 4) -> int:
    """Upper bound on the bytes one ``CalibStats`` of ``max_rows`` rows of width ``in_features``
    holds: the fp64 Gram and the held-out rows (``itemsize`` bytes per value)."""
    held = -(-max_rows // HOLDOUT_EVERY)
    return in_features * in_features * 8 + held * in_features * itemsize


class _RowStream:
    """What ``RowDigest`` and ``StatsRecorder`` share: the row cap, the width check, the
    problem check and the digest of the rows in stream order."""

    def __init__(self, in_features: int, max_rows: Optional[int]):
        self.n = in_features
        self.max_rows = max_rows
        self.seen = 0
        self.max_abs = 0.0
        self.hash = hashlib.blake2b(digest_size=16)
        self.problem: Optional[str] = None

    def full(self) -> bool:
        return self.max_rows is not None and self.seen >= self.max_rows

    def _take(self, x: Tensor) -> Optional[Tensor]:
        """The chunk's rows still wanted, ``(k, n)``, contiguous on the CPU and hashed; None
        when there are none."""
        if self.full():
            return None
        x = x.detach().reshape(-1, x.shape[-1])
        if self.max_rows is not None:
            x = x[: self.max_rows - self.seen]
        if x.shape[-1] != self.n:
            raise ValueError(f"calibration rows must have last dim {self.n}, got {x.shape[-1]}")
        if not x.shape[0]:
            return None
        if self.problem is None:
            self.problem = calibration_problem(x, gram_dtype=None)
        x = x.cpu().contiguous()
        _hash_rows(self.hash, x, first=not self.seen)
        return x


class RowDigest(_RowStream):
    """What ``StatsRecorder`` would say about a stream of rows without keeping its Gram: the
    digest (the same one) and the rows' problem (non-finite, or a Gram that would overflow
    fp32, from the columns' sums of squares), in ``O(n)`` memory."""

    def __init__(self, in_features: int, max_rows: Optional[int] = None):
        super().__init__(in_features, max_rows)
        self.squares = torch.zeros(in_features, dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        x = self._take(x)
        if x is None:
            return
        if self.problem is None:
            self.max_abs = max(self.max_abs, float(x.abs().max()))
            self.squares += x.double().pow(2).sum(0)
        self.seen += x.shape[0]

    def finish(self) -> tuple[str, Optional[str]]:
        """``(digest, problem or None)``."""
        problem = self.problem
        if problem is None and not self.seen:
            problem = "calibration inputs are empty"
        if problem is None and float(self.squares.max()) > gram_limit(torch.float32):
            problem = too_large(self.max_abs, torch.float32)
        return self.hash.hexdigest(), problem


class StatsRecorder(_RowStream):
    """Accumulates one ``CalibStats`` from row chunks ``(..., n)``; rows past ``max_rows`` are
    ignored. The digest and the split depend on the rows alone, not on how they were chunked.

    ``scratch``: a dict the recorders of one recording share, holding one ``n x n`` buffer
    per width and dtype for the chunk products (each product was two fresh ``n x n``
    temporaries, which left the allocator holding more than the Grams themselves)."""

    def __init__(self, in_features: int, max_rows: Optional[int] = None,
                 scratch: Optional[dict] = None):
        super().__init__(in_features, max_rows)
        self.scratch = {} if scratch is None else scratch
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.held: list[Tensor] = []
        self.last: Optional[Tensor] = None

    def add(self, x: Tensor) -> None:
        x = self._take(x)
        if x is None:
            return
        held = (torch.arange(self.seen, self.seen + x.shape[0]) % HOLDOUT_EVERY
                == HOLDOUT_EVERY - 1)
        if self.problem is None:
            big = float(x.abs().max())
            self.max_abs = max(self.max_abs, big)
            fit = x[~held]
            w = fit if fit.dtype in (torch.float32, torch.float64) else fit.float()
            if big > _FP32_SAFE:                         # squares would overflow fp32
                w = w.double()
            buf = self.scratch.get((self.n, w.dtype))
            if buf is None:
                buf = self.scratch[(self.n, w.dtype)] = torch.empty(self.n, self.n,
                                                                    dtype=w.dtype)
            for i in range(0, w.shape[0], _GEMM_ROWS):   # short sums in w's dtype, total in fp64
                c = w[i:i + _GEMM_ROWS]
                torch.mm(c.mT, c, out=buf)
                self.gram += buf
        if held.any():
            self.held.append(x[held])
        self.last = x[-1:]
        self.seen += x.shape[0]

    def finish(self) -> CalibStats:
        if not self.seen:
            raise ValueError("no calibration rows were recorded")
        held = torch.cat(self.held) if self.held else None
        count = self.seen - (0 if held is None else held.shape[0])
        gram = self.gram
        if held is None:            # fewer than HOLDOUT_EVERY rows: the last one is held out
            held = self.last
            if self.problem is None:
                v = held.double()
                gram = gram - v.mT @ v
            count -= 1
        return CalibStats(gram, count, held, self.max_abs, self.hash.hexdigest(), self.problem)


def split_calib(X: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic split of calibration rows ``X (N, n)``: every ``HOLDOUT_EVERY``-th row is
    held out (at least one), spread over the data rather than taken from its end."""
    held = torch.arange(X.shape[0], device=X.device) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if not held.any():
        held[-1] = True
    return X[~held], X[held]


def calib_stats(calib: Union[Tensor, CalibStats]) -> CalibStats:
    """``calib`` as ``CalibStats``: rows ``(..., n)`` are reduced exactly as a stream of them
    would be (the ``split_calib`` split), statistics pass through."""
    if isinstance(calib, CalibStats):
        return calib
    rec = StatsRecorder(calib.shape[-1])
    rec.add(calib)
    return rec.finish()


def calib_digest(calib: Union[Tensor, CalibStats]) -> str:
    """The content hash of calibration rows (or of the rows ``CalibStats`` came from): the same
    for a row matrix and for any chunking of it."""
    if isinstance(calib, CalibStats):
        return calib.digest
    x = calib.detach().reshape(-1, calib.shape[-1]).cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    if x.shape[0]:
        _hash_rows(h, x, first=True)
    return h.hexdigest()


def _hash_rows(h, x: Tensor, first: bool) -> None:
    """Feed rows ``x`` (contiguous, on the CPU) to the digest ``h``; the first chunk also feeds
    the row width and dtype, so any chunking of the same rows hashes alike."""
    if first:
        h.update(f"{x.shape[-1]}|{x.dtype}".encode())
    h.update(x.view(torch.uint8).numpy().tobytes())
