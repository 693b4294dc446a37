"""structfx.timing against a fake clock: which runs are timed and which figure is returned.
No real time is asserted: each call of the timed function advances the fake clock by a known
duration, so the answer is a plain statistic of those durations."""
import statistics
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

from structfx import timing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __enter__(self):
        self._patch = mock.patch.object(timing, "_clock", lambda: self.now)
        self._patch.start()
        return self

    def __exit__(self, *exc):
        self._patch.stop()

    def function(self, durations):
        """A function whose i-th call takes durations[i] seconds of fake time."""
        calls = []

        def fn():
            self.now += durations[len(calls)]
            calls.append(None)
        fn.calls = calls
        return fn


durations = st.lists(st.floats(1e-6, 1.0), min_size=12, max_size=12)


@settings(max_examples=50, deadline=None)
@given(d=durations, repeats=st.integers(1, 9), warmup=st.integers(0, 2), best=st.booleans())
def test_fixed_repeats_skip_the_warmup_and_take_the_median_or_best(d, repeats, warmup, best):
    with FakeClock() as clock:
        fn = clock.function(d)
        got = timing.time_fn(fn, repeats=repeats, warmup=warmup, best=best)
    timed = d[warmup:warmup + repeats]
    assert len(fn.calls) == warmup + repeats
    assert got == pytest.approx(min(timed) if best else statistics.median(timed))


@pytest.fixture
def clock():
    with FakeClock() as c:
        yield c


def test_a_budget_runs_until_spent_within_the_bounds(clock):
    fn = clock.function([0.1] * 100)
    # 0.1 s a call, 0.35 s budget: the 4th run is the first to start past it
    assert timing.time_fn(fn, budget_s=0.35, min_repeats=1) == pytest.approx(0.1)
    assert len(fn.calls) == 1 + 4
    fn = clock.function([0.1] * 100)
    timing.time_fn(fn, budget_s=0.35, min_repeats=7)          # at least min_repeats
    assert len(fn.calls) == 1 + 7
    fn = clock.function([0.1] * 100)
    timing.time_fn(fn, budget_s=10.0, max_repeats=3)          # at most max_repeats
    assert len(fn.calls) == 1 + 3
    with pytest.raises(ValueError, match="repeats= or budget_s="):
        timing.time_fn(fn)


def test_alternating_takes_turns_and_keeps_the_median_or_best_round(clock):
    order = []
    a_times, b_times = [0.5, 0.3, 0.1, 0.2, 0.4], [1.0, 2.0, 3.0, 4.0, 5.0]

    def a():
        clock.now += a_times[sum(o == "a" for o in order)]
        order.append("a")

    def b():
        clock.now += b_times[sum(o == "b" for o in order)]
        order.append("b")

    got = timing.time_alternating({"a": a, "b": b}, 4, initial_warmup=1, keep="median",
                                  repeats=1, warmup=0)
    assert order == ["a", "b"] + ["a", "b"] * 4
    assert got == {"a": pytest.approx(statistics.median(a_times[1:])),
                   "b": pytest.approx(statistics.median(b_times[1:]))}
    order.clear()
    got = timing.time_alternating({"a": a, "b": b}, 2, keep="min", repeats=2, warmup=0)
    # round 1: a 0.5, 0.3 -> 0.4; round 2: a 0.1, 0.2 -> 0.15; b 1.5 then 3.5
    assert got == {"a": pytest.approx(0.15), "b": pytest.approx(1.5)}
    with pytest.raises(ValueError, match="keep"):
        timing.time_alternating({"a": a}, 1, keep="mean", repeats=1)
