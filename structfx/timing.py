"""Wall-clock timing: the one timer behind ``compress(measure=True)``, the cost model's
``Config(time_candidates=True)`` and its CPU microbenchmark, ``python -m structfx.bench`` and
the examples.

``time_fn`` times one function; its parameters are the choices each caller makes:

- how many runs: a fixed ``repeats``, or as many as fit in ``budget_s`` (between
  ``min_repeats`` and ``max_repeats``): cheap calls then get many samples, so the few that
  lose the CPU to another process do not move the median;
- which figure: the ``median``, or the ``best`` run (a measurement of the machine rather than
  of a workload: on a shared machine load only ever slows a run down);
- on CUDA: ``sync`` (synchronize around each run: end-to-end latency of a whole model), or
  ``flush_l2`` (``triton.testing.do_bench``, which empties L2 between runs, so small weights
  don't stay cached the way they wouldn't inside a network).

``time_alternating`` times several functions taking turns, so that load from other processes
hits them alike: use it when what matters is their ratio.

Take ratios of times measured in one process; absolute figures drift with machine load.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

_clock = time.perf_counter   # (tests replace it with a fake clock)


def time_fn(fn: Callable[[], object], *, repeats: Optional[int] = None,
            budget_s: Optional[float] = None, min_repeats: int = 1, max_repeats: int = 1000,
            warmup: int = 1, best: bool = False, sync: bool = False,
            flush_l2: bool = False) -> float:
    """Seconds one call of ``fn()`` takes: the median (``best``: the fastest) of the timed runs,
    after ``warmup`` untimed calls.

    Runs: ``repeats`` if given, else as many as ``budget_s`` allows, at least ``min_repeats``
    and at most ``max_repeats``. ``sync``: ``torch.cuda.synchronize()`` before and after each
    run. ``flush_l2``: CUDA only, time with ``triton.testing.do_bench`` (its own warm-up and
    repetitions, L2 flushed between runs); the other run-count arguments do not apply."""
    if flush_l2:
        import triton.testing  # here: triton is not imported on `import structfx`

        ms = triton.testing.do_bench(fn, warmup=25, rep=100,
                                     return_mode="min" if best else "median")
        return ms * 1e-3
    if repeats is None and budget_s is None:
        raise ValueError("time_fn: give repeats= or budget_s=")
    clock = _clock
    done = torch.cuda.synchronize if sync else (lambda: None)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = clock()

    def more() -> bool:
        if repeats is not None:
            return len(times) < repeats
        return len(times) < max_repeats and (len(times) < min_repeats
                                             or clock() - start < budget_s)

    while more():
        done()
        t0 = clock()
        fn()
        done()
        times.append(clock() - t0)
    return min(times) if best else statistics.median(times)


def time_alternating(fns: dict[str, Callable[[], object]], rounds: int, *,
                     initial_warmup: int = 0, keep: str = "median", **each) -> dict[str, float]:
    """Seconds per call of each function in ``fns``, the functions taking turns for ``rounds``
    rounds: each round times each function once with ``time_fn(fn, **each)`` (its ``warmup``
    is per round). ``initial_warmup``: untimed calls of each function before the first round.
    ``keep``: the ``"median"`` of the rounds' figures, or the ``"min"`` (the best round: the
    one least disturbed by other load)."""
    if keep not in ("median", "min"):
        raise ValueError(f"time_alternating: keep must be 'median' or 'min', got {keep!r}")
    for fn in fns.values():
        for _ in range(initial_warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, **each))
    pick = min if keep == "min" else statistics.median
    return {k: pick(v) for k, v in times.items()}


def median_time(fn: Callable, *args, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of ``fn(*args)`` under ``no_grad``, CUDA synchronized around each run when
    an argument is a CUDA tensor: a whole model's latency (``compress(measure=True)``, the
    demo)."""
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    with torch.no_grad():
        return time_fn(lambda: fn(*args), repeats=repeats, warmup=warmup, sync=cuda)
