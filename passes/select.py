"""Select pass: which candidates each layer is offered (``candidate_grid``), and one option per
layer that meets the budget with the least weight error (``select``).

A multiple-choice knapsack, solved exactly as a small MILP (``scipy.optimize.milp``, HiGHS):
binary ``x[l, k]`` (layer ``l`` takes option ``k``), ``sum_k x[l, k] = 1`` per layer, the
budgets as linear rows. Greedy by error-per-parameter-saved is not exact here: options come in
discrete sizes, and the greedy can overshoot the budget with an expensive option where a
cheaper one would have done (tests/test_select.py shows such an instance).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS prints some of its internals from C straight to file descriptor 1 (e.g.
    ``HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();``), past
    ``disp=False``: point the descriptor at /dev/null while it runs."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):     # no real descriptor 1 (embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def candidate_grid(model, m: int, n: int, tokens: int, config) -> list:
    """The candidates one Linear site (``m`` out, ``n`` in, ``tokens`` rows) is offered: dense
    first, then those of ``model.candidates`` (a ``CostModel``: the structures ``config`` asks
    for that save parameters) predicted, or timed, faster than dense; all of them with
    ``config.force``."""
    return faster_than_dense(model.candidates(m, n, tokens, config), config.force)


def faster_than_dense(candidates: Sequence, force: bool = False) -> list:
    """``candidates[0]`` (dense) and those of the rest whose ``time_s`` beats it; every one
    with ``force``."""
    dense, *rest = candidates
    return [dense] + [c for c in rest if force or c.time_s < dense.time_s]


@dataclass(frozen=True)
class Option:
    """One way to run a layer. Option 0 of every layer is dense: the layer's own params and
    FLOPs, error 0."""

    params: int
    flops: int
    error: float    # relative Frobenius weight error ||W - W_hat|| / ||W||


@dataclass
class Selection:
    """What ``select`` chose: ``choice[l]`` indexes ``layers[l]``; ``objective`` is
    ``sum_l w_l * error_l^2`` of that choice (``w_l``: the weights, by default the dense
    parameter counts); totals are over all layers."""

    choice: list[int]
    objective: float
    params: int
    flops: int
    dense_params: int
    dense_flops: int


def select(layers: Sequence[Sequence[Option]], *, params: Optional[float] = None,
           flops: Optional[float] = None, max_error: Optional[float] = None,
           force: Optional[bool] = None,
           weights: Optional[Sequence[float]] = None) -> Selection:
    """Choose one option per layer.

    With a budget (``params`` / ``flops``: fractions of the dense totals over all layers), the
    choice meets it and minimizes ``sum_l w_l * error_l^2``. By default ``w_l`` is the layer's
    dense parameter count: the parameter-weighted squared relative error, i.e. the squared
    error of all weights together if every layer's entries had the same scale. ``weights``:
    one ``w_l >= 0`` per layer instead (``passes/sensitivity.py``: how much the model's output
    moves per unit of relative error in that layer's output). ``max_error`` excludes options
    whose error exceeds it (dense always stays allowed).

    No budget, only ``max_error``: compress as far as ``max_error`` allows (per layer, the
    allowed option with the fewest parameters; ties go to the lower error).

    Raises ``ValueError`` if a budget can't be met with the allowed options. ``force``: only
    words that message (whether the caller already offered the layers predicted slower).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # here: not on `import structfx`
    from scipy.sparse import csr_array
    if params is None and flops is None and max_error is None:
        raise ValueError("give params=, flops= or max_error=")
    for name, frac in (("params", params), ("flops", flops), ("max_error", max_error)):
        if frac is not None and not frac > 0:
            raise ValueError(f"select: {name} must be > 0, got {frac!r}")
    for l, opts in enumerate(layers):
        if not opts or opts[0].error != 0:
            raise ValueError(f"select: layer {l} needs the dense option (error 0) at index 0")

    if weights is None:
        weights = [opts[0].params for opts in layers]
    weights = [float(w) for w in weights]
    if len(weights) != len(layers) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"select: weights must be {len(layers)} finite numbers >= 0, "
                         f"got {weights!r}")
    allowed = [[k for k, o in enumerate(opts) if k == 0 or max_error is None
                or o.error <= max_error] for opts in layers]
    dense_params = sum(opts[0].params for opts in layers)
    dense_flops = sum(opts[0].flops for opts in layers)

    def result(choice: list[int]) -> Selection:
        picked = [opts[k] for opts, k in zip(layers, choice)]
        return Selection(choice, sum(w * o.error ** 2 for w, o in zip(weights, picked)),
                         sum(o.params for o in picked), sum(o.flops for o in picked),
                         dense_params, dense_flops)

    if params is None and flops is None:
        return result([min(ks, key=lambda k: (opts[k].params, opts[k].error))
                       for opts, ks in zip(layers, allowed)])

    # Sums of integers: "total <= frac * dense" is "total <= floor(frac * dense)".
    budgets = []   # (name, fraction, attribute, integer limit, dense total)
    for name, frac, dense in (("params", params, dense_params), ("flops", flops, dense_flops)):
        if frac is None:
            continue
        limit = math.floor(frac * dense)
        smallest = sum(min(getattr(opts[k], name) for k in ks)
                       for opts, ks in zip(layers, allowed))
        if smallest > limit:
            stuck = sum(len(opts) == 1 for opts in layers)
            if force:
                none = "none saves parameters with this grid, even with force=True"
            elif force is None:
                none = ("none predicted faster than dense, or none saves parameters; "
                        "force=True also offers the slower ones")
            else:
                none = "none predicted faster than dense: force=True replaces them anyway"
            why = (f" {stuck} of {len(layers)} layers have no structured option ({none});"
                   if stuck else "")
            raise ValueError(
                f"the {name} budget ({frac:g} of dense) can't be met: the smallest allowed "
                f"options keep {smallest / dense:.3f} of the dense {name}.{why} Add lower "
                f"rank_fractions / higher compressions, or relax max_error")
        budgets.append((name, frac, limit, dense))
    if not layers:
        return result([])

    # Variables: the allowed (layer, option) pairs. Rows are scaled to fractions of the dense
    # totals so HiGHS sees numbers near 1.
    pairs = [(l, k) for l, ks in enumerate(allowed) for k in ks]
    cost = np.array([weights[l] * layers[l][k].error ** 2 for l, k in pairs])
    one_each = csr_array((np.ones(len(pairs)), ([l for l, _ in pairs], range(len(pairs)))),
                         shape=(len(layers), len(pairs)))
    rows = [np.array([getattr(layers[l][k], name) for l, k in pairs], dtype=float)
            / max(dense, 1) for name, _, _, dense in budgets]
    slack = [0.5] * len(budgets)    # integer totals: anything below limit + 1 is within limit
    scale = max(1.0, float(cost.max(initial=0.0)))
    for _ in range(5):
        constraints = [LinearConstraint(one_each, 1, 1)]
        constraints += [LinearConstraint(row, -np.inf, (limit + s) / max(dense, 1))
                        for row, (_, _, limit, dense), s in zip(rows, budgets, slack)]
        with _quiet_stdout():
            res = milp(cost / scale, constraints=constraints,
                       integrality=np.ones(len(pairs)), bounds=Bounds(0, 1),
                       options={"mip_rel_gap": 0})
        if res.status == 2:
            raise ValueError(
                f"the {' and '.join(b[0] for b in budgets)} budgets "
                f"({', '.join(f'{b[0]}={b[1]:g}' for b in budgets)}) can't be met together "
                f"with the allowed options; relax one, add lower rank_fractions / higher "
                f"compressions, or relax max_error")
        if res.status != 0 or res.x is None:
            raise RuntimeError(f"select: the MILP solver failed: {res.message}")
        choice = [0] * len(layers)
        for j, (l, k) in enumerate(pairs):
            if res.x[j] > 0.5:
                choice[l] = k
        sel = result(choice)
        # The solver's feasibility tolerance is relative; with huge totals it could let an
        # integer total slip past its limit. Check exactly and tighten if it did.
        over = [getattr(sel, name) - limit for name, _, limit, _ in budgets]
        if all(o <= 0 for o in over):
            return sel
        slack = [s - max(o, 0) for s, o in zip(slack, over)]
    raise RuntimeError("select: the MILP solution kept exceeding the budget by rounding")
