"""Calibration statistics within ``Config.calib_memory``: recorded in groups that fit, the same
decisions and factors as recording them all at once, forward passes cut after each group."""
import torch
import pytest
from torch import fx, nn

import structfx
from structfx import pipeline
from structfx.passes.calib_stats import RowDigest, StatsRecorder, stats_bytes
from structfx.passes.match import match_linears


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(),
                         nn.Linear(64, 64)).eval()


CFG = structfx.Config(progress=False, min_params=1024, force=True, blocks=(1, 4),
                      rank_fractions=(0.25, 0.5))


@pytest.mark.parametrize("rows", [
    torch.randn(50, 12),
    torch.cat([torch.randn(10, 12), torch.full((1, 12), float("nan")), torch.randn(5, 12)]),
    torch.full((20, 12), 3e18),
])
def test_row_digest_says_what_the_statistics_say(rows):
    a, b = StatsRecorder(12, 40), RowDigest(12, 40)
    for chunk in rows.split(7):
        a.add(chunk)
        b.add(chunk)
    st = a.finish()
    from structfx.passes.checks import calibration_problem

    digest, problem = b.finish()
    assert digest == st.digest
    assert problem == calibration_problem(st)


def test_groups_fit_the_budget_and_keep_sites_of_one_input_together():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    gm = fx.symbolic_trace(model)
    sites = match_linears(gm)
    cal = pipeline.Calibration(gm, [(torch.randn(4, 32),)], budget=stats_bytes(32, 8192))
    assert [[s.name for s in g] for g in cal.groups(sites)] == [[sites[0].name],
                                                                 [sites[1].name]]
    cal.budget = 2 * stats_bytes(32, 8192)
    assert len(cal.groups(sites)) == 1


def test_grouped_recording_gives_the_same_model_and_holds_one_group_at_a_time(monkeypatch):
    model, x = _mlp(), torch.randn(32, 64)
    calib = [(torch.randn(32, 64),) for _ in range(4)]
    made, peak = [], [0]
    real_init, real_record = pipeline.Calibration.__init__, pipeline.record_stats

    def init(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    def record(gm, sites, batches, max_rows=8192):
        out = real_record(gm, sites, batches, max_rows)
        grams = {id(st): st.gram.numel() * 8 for st in out.values()}   # shared by q, k, v
        peak[0] = max(peak[0], sum(grams.values()))
        return out

    monkeypatch.setattr(pipeline.Calibration, "__init__", init)
    monkeypatch.setattr(pipeline, "record_stats", record)
    whole = structfx.compress(model, (x,), CFG, calibration=calib)
    one_pass, whole_peak = made[-1].recordings, peak[0]
    peak[0] = 0
    grouped = structfx.compress(model, (x,), CFG.replace(calib_memory=1), calibration=calib)
    cut = made[-1]
    assert one_pass == 1
    # a digest pass, then one recording per input node for the estimates and for the finals
    assert cut.recordings == 1 + 3 + 3
    assert peak[0] < whole_peak                      # one node's Gram at a time, not three
    assert peak[0] == max(n * n * 8 for n in (64, 128))
    torch.testing.assert_close(grouped(x), whole(x), rtol=0, atol=0)
    for a, b in zip(whole.state_dict().values(), grouped.state_dict().values()):
        assert torch.equal(a, b)


def test_recording_stops_after_the_last_watched_node():
    calls = []

    class Tail(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x * 2

    class Leafy(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Tail) or super().is_leaf_module(m, name)

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), Tail())
    gm = fx.GraphModule(model, Leafy().trace(model))
    sites = match_linears(gm)
    stats = pipeline.record_stats(gm, sites[:1], [(torch.randn(5, 8),)] * 3)
    assert set(stats) == {sites[0].name} and stats[sites[0].name].rows == 15
    assert calls == []                               # nothing after the watched input ran
    pipeline.record_stats(gm, sites, [(torch.randn(5, 8),)])
    assert calls == []                               # the last Linear's input is before Tail
    gm(torch.randn(5, 8))
    assert calls == [1]


def test_broken_calibration_is_named_in_the_digest_pass():
    model, x = _mlp(), torch.randn(8, 64)
    bad = torch.randn(32, 64)
    bad[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"layer '0'.*inf"):
        structfx.compress(model, (x,), CFG.replace(calib_memory=1), calibration=[(bad,)])


def test_calib_memory_is_checked():
    with pytest.raises(ValueError, match="calib_memory"):
        structfx.Config(calib_memory=0)


def test_recorded_statistics_are_freed_without_the_garbage_collector():
    """No reference cycle holds a recording: dropping the statistics frees their Grams at once
    (a class defined per call, or the early stop's traceback, once kept them until a gc)."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    gm = fx.symbolic_trace(model)
    sites = match_linears(gm)
    gc.disable()
    try:
        stats = pipeline.record_stats(gm, sites[:1], [(torch.randn(4, 16),)] * 2)
        grams = [weakref.ref(st.gram) for st in stats.values()]
        del stats
        assert all(g() is None for g in grams)
    finally:
        gc.enable()


def test_ss1_index_cache_is_bounded_by_bytes(monkeypatch):
    from structfx.kernels import ss1_hash

    cache = ss1_hash._IndexCache(ss1_hash._weight_index_build, limit=3 * 256 * 128 * 8)
    first = cache(256, 128, 2, 1, 32, 64)
    assert cache(256, 128, 2, 1, 32, 64) is first                    # a hit
    for seed in range(2, 7):
        cache(256, 128, 2, seed, 32, 64)
    assert len(cache.entries) == 3 and cache.bytes == 3 * 256 * 128 * 8
    assert (256, 128, 2, 1, 32, 64) not in cache.entries             # least recent went first
    torch.testing.assert_close(cache(256, 128, 2, 1, 32, 64), first)  # rebuilt the same
    big = ss1_hash._IndexCache(ss1_hash._weight_index_build, limit=1)
    assert big(256, 128, 2, 1, 32, 64).shape == (256, 128) and len(big.entries) == 1
