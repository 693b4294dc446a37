"""Wall-clock timing shared by ``compress(measure=True)``, the demo and the examples."""
from __future__ import annotations

import time
from typing import Callable

import torch


def median_time(fn: Callable, *args, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of ``fn(*args)`` under ``no_grad`` (CUDA synchronized around each run).
    Take ratios of two of these in one process; absolute figures drift with machine load."""
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn(*args)
            sync()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
