"""select: the exact multiple-choice knapsack, checked against brute force."""
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from structfx.passes.select import Option, Selection, select


def brute_force(layers, params=None, flops=None, max_error=None):
    """Best (objective, choice) over every combination, or None if no combination fits."""
    dense_p = sum(opts[0].params for opts in layers)
    dense_f = sum(opts[0].flops for opts in layers)
    allowed = [[k for k, o in enumerate(opts)
                if k == 0 or max_error is None or o.error <= max_error] for opts in layers]
    best = None
    for choice in itertools.product(*allowed):
        picked = [layers[l][k] for l, k in enumerate(choice)]
        if params is not None and sum(o.params for o in picked) > params * dense_p:
            continue
        if flops is not None and sum(o.flops for o in picked) > flops * dense_f:
            continue
        obj = sum(layers[l][0].params * o.error ** 2 for l, o in enumerate(picked))
        if best is None or obj < best[0]:
            best = (obj, list(choice))
    return best


def greedy_by_ratio(layers, params):
    """The tempting heuristic: from all-dense, take the move with the most parameters saved
    per unit of added error until the budget fits."""
    choice = [0] * len(layers)
    limit = params * sum(opts[0].params for opts in layers)

    def total():
        return sum(layers[l][k].params for l, k in enumerate(choice))

    while total() > limit:
        moves = []
        for l, opts in enumerate(layers):
            cur = opts[choice[l]]
            for k, o in enumerate(opts):
                saved = cur.params - o.params
                added = opts[0].params * (o.error ** 2 - cur.error ** 2)
                if saved > 0:
                    moves.append((saved / max(added, 1e-12), l, k))
        _, l, k = max(moves)
        choice[l] = k
    return sum(layers[l][0].params * layers[l][k].error ** 2 for l, k in enumerate(choice))


@st.composite
def instances(draw):
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        dense = Option(draw(st.integers(10, 1000)), draw(st.integers(10, 1000)), 0.0)
        others = [Option(draw(st.integers(1, dense.params)), draw(st.integers(1, 2 * dense.flops)),
                         draw(st.floats(0.0, 1.0)))
                  for _ in range(draw(st.integers(0, 3)))]
        layers.append([dense] + others)
    params = draw(st.none() | st.floats(0.05, 1.0))
    flops = draw(st.none() | st.floats(0.05, 1.0))
    max_error = draw(st.none() | st.floats(0.01, 1.0))
    if params is None and flops is None and max_error is None:
        params = draw(st.floats(0.05, 1.0))
    return layers, params, flops, max_error


@settings(max_examples=150, deadline=None)
@given(instances())
def test_milp_matches_brute_force(inst):
    layers, params, flops, max_error = inst
    if params is None and flops is None:
        # No budget: the smallest allowed option of each layer.
        sel = select(layers, max_error=max_error)
        want = sum(min(o.params for k, o in enumerate(opts) if k == 0 or o.error <= max_error)
                   for opts in layers)
        assert sel.params == want
        assert all(k == 0 or layers[l][k].error <= max_error for l, k in enumerate(sel.choice))
        return
    best = brute_force(layers, params, flops, max_error)
    if best is None:
        with pytest.raises(ValueError, match="budget"):
            select(layers, params=params, flops=flops, max_error=max_error)
        return
    sel = select(layers, params=params, flops=flops, max_error=max_error)
    scale = max(1.0, max(opts[0].params for opts in layers))
    assert sel.objective == pytest.approx(best[0], abs=1e-6 * scale)
    # The choice is feasible and its reported totals are its own.
    picked = [layers[l][k] for l, k in enumerate(sel.choice)]
    assert sel.params == sum(o.params for o in picked)
    assert sel.flops == sum(o.flops for o in picked)
    if params is not None:
        assert sel.params <= params * sel.dense_params
    if flops is not None:
        assert sel.flops <= flops * sel.dense_flops
    if max_error is not None:
        assert all(k == 0 or layers[l][k].error <= max_error for l, k in enumerate(sel.choice))


def test_exact_beats_greedy():
    # Need to save 50 of 200 params. Greedy takes A's option first (70 saved for cost 1.0:
    # the best ratio) and is done; B's option alone also fits, for cost 0.9.
    layers = [[Option(100, 100, 0.0), Option(30, 30, 0.1)],
              [Option(100, 100, 0.0), Option(45, 45, 0.009 ** 0.5)]]
    assert 100 * layers[1][1].error ** 2 == pytest.approx(0.9)
    sel = select(layers, params=0.75)
    assert sel.choice == [0, 1]
    assert sel.objective == pytest.approx(0.9)
    assert greedy_by_ratio(layers, 0.75) == pytest.approx(1.0)
    assert brute_force(layers, 0.75)[0] == pytest.approx(sel.objective)


def test_selection_fields_and_dense_when_budget_is_loose():
    layers = [[Option(100, 400, 0.0), Option(50, 200, 0.2)], [Option(60, 240, 0.0)]]
    sel = select(layers, params=1.0)
    assert isinstance(sel, Selection)
    assert sel.choice == [0, 0] and sel.objective == 0.0
    assert (sel.params, sel.flops, sel.dense_params, sel.dense_flops) == (160, 640, 160, 640)
    assert select(layers, flops=0.7).choice == [1, 0]


def test_max_error_excludes_options_but_never_dense():
    layers = [[Option(100, 100, 0.0), Option(20, 20, 0.5), Option(60, 60, 0.05)]]
    assert select(layers, max_error=0.1).choice == [2]       # no budget: as small as allowed
    assert select(layers, max_error=0.01).choice == [0]
    assert select(layers, params=0.7, max_error=0.1).choice == [2]


def test_errors_name_the_budget_and_hint():
    layers = [[Option(100, 100, 0.0), Option(50, 50, 0.3)]]
    with pytest.raises(ValueError, match=r"params budget.*0\.500.*rank_fractions.*max_error"):
        select(layers, params=0.4)
    with pytest.raises(ValueError, match="flops budget"):
        select(layers, flops=0.2)
    with pytest.raises(ValueError, match="params budget"):
        select(layers, params=0.6, max_error=0.1)            # the only small option is excluded
    with pytest.raises(ValueError, match=r"give params=, flops= or max_error="):
        select(layers)
    # Each budget alone is reachable, both together are not.
    two = [[Option(100, 100, 0.0), Option(40, 100, 0.1), Option(100, 40, 0.1)]]
    with pytest.raises(ValueError, match="together"):
        select(two, params=0.5, flops=0.5)
    with pytest.raises(ValueError, match="dense option"):
        select([[Option(50, 50, 0.3)]], params=0.5)


# ----------------------------------------------------------------------------- the offer
@settings(max_examples=100, deadline=None)
@given(dense=st.floats(1e-6, 1.0), others=st.lists(st.floats(1e-6, 2.0), max_size=8),
       force=st.booleans())
def test_faster_than_dense_keeps_dense_first_and_drops_the_slower(dense, others, force):
    from types import SimpleNamespace as C

    from structfx.passes.select import faster_than_dense

    cands = [C(name="dense", time_s=dense)] + [C(name=i, time_s=t) for i, t in enumerate(others)]
    got = faster_than_dense(cands, force)
    assert got[0] is cands[0]
    # force: everything, in order; else exactly the strictly faster ones, in order
    want = cands if force else [cands[0]] + [c for c in cands[1:] if c.time_s < dense]
    assert [c.name for c in got] == [c.name for c in want]
    assert all(c.time_s < dense for c in got[1:]) or force


def test_candidate_grid_offers_what_the_cost_model_prices_faster():
    import torch

    from structfx.config import Config
    from structfx.passes.cost_model import CostModel
    from structfx.passes.device import DEVICE_TABLE
    from structfx.passes.select import candidate_grid

    gpu = CostModel(DEVICE_TABLE["H100 SXM"], torch.bfloat16)
    # Decode on a big layer: half-size BLAST reads half the weights, so it is offered...
    offered = candidate_grid(gpu, 4096, 4096, 1, Config(blocks=(4,), rank_fractions=(0.5,)))
    assert [c.describe() for c in offered] == ["dense", "blast b=4 r=1022"]  # 0.5*4096²/8208
    assert offered[1].time_s < offered[0].time_s
    # ...a small one loses to one GEMM on its second launch: only force offers it.
    small = Config(blocks=(4,), rank_fractions=(0.5,))
    assert [c.structure for c in candidate_grid(gpu, 128, 128, 1, small)] == ["dense"]
    forced = candidate_grid(gpu, 128, 128, 1, small.replace(force=True))
    assert [c.describe() for c in forced] == ["dense", "blast b=4 r=30"]     # 0.5*128²/272
    assert forced[1].time_s > forced[0].time_s
