"""Streamed calibration statistics: the same Gram, split and digest as the row matrix, however
the rows arrive; never the full rows."""
import torch
import pytest

from structfx.passes.calib_stats import (HOLDOUT_EVERY, CalibStats, StatsRecorder, calib_digest,
                                         calib_stats, split_calib)
from structfx.passes.checks import calibration_problem, check_calib_arg
from structfx.passes.estimate import lowrank_spectrum
from structfx.passes.factorize_blast import factorize_blast
from structfx.passes.project_ss1 import project_ss1


def _stream(X, sizes, max_rows=None):
    rec = StatsRecorder(X.shape[-1], max_rows)
    i = 0
    for k in sizes:
        rec.add(X[i:i + k])
        i += k
    return rec.finish()


@pytest.mark.parametrize("sizes", [[100], [1] * 100, [7, 13, 80], [33, 33, 34]])
def test_stream_matches_the_row_matrix(sizes):
    X = torch.randn(100, 24)
    st = _stream(X, sizes)
    fit, held = split_calib(X)
    assert st.count == fit.shape[0] and st.rows == 100
    torch.testing.assert_close(st.held, held)
    torch.testing.assert_close(st.gram, fit.double().mT @ fit.double(), rtol=1e-6, atol=1e-5)
    assert st.digest == calib_digest(X) == calib_stats(X).digest
    assert st.max_abs == float(X.abs().max())


def test_digest_sees_every_row_and_the_dtype():
    X = torch.randn(40, 8)
    Y = X.clone()
    Y[17, 3] += 1e-3
    assert calib_digest(X) != calib_digest(Y)
    assert calib_digest(X) != calib_digest(X.double())
    assert calib_digest(X) != calib_digest(X[:39])


def test_max_rows_caps_the_stream():
    X = torch.randn(50, 6)
    st = _stream(X, [20, 20, 10], max_rows=30)
    assert st.rows == 30
    assert st.digest == calib_digest(X[:30])
    torch.testing.assert_close(st.held, split_calib(X[:30])[1])


def test_fewer_rows_than_the_holdout_period_hold_out_the_last():
    X = torch.randn(HOLDOUT_EVERY - 3, 6)
    st = _stream(X, [2, 3])
    fit, held = split_calib(X)
    assert st.count == fit.shape[0] and held.shape[0] == 1
    torch.testing.assert_close(st.held, X[-1:])
    torch.testing.assert_close(st.gram, fit.double().mT @ fit.double(), rtol=1e-6, atol=1e-6)


def test_huge_activations_do_not_overflow_the_gram():
    X = torch.randn(64, 8) * 1e18          # squares overflow fp32, not fp64
    st = calib_stats(X)
    assert torch.isfinite(st.gram).all()
    assert calibration_problem(st) is not None          # ... but an fp32 factorization would
    assert calibration_problem(st, gram_dtype=None) is None


def test_non_finite_rows_are_reported_not_summed():
    X = torch.randn(32, 8)
    X[5, 2] = float("nan")
    st = _stream(X, [16, 16])
    assert "NaN" in calibration_problem(st)
    with pytest.raises(ValueError, match="NaN"):
        check_calib_arg("who", st, 8)
    with pytest.raises(ValueError, match="last dim 9"):
        check_calib_arg("who", calib_stats(torch.randn(4, 8)), 9)


def test_factorizations_give_the_same_result_from_rows_and_from_statistics():
    torch.manual_seed(0)
    W = torch.randn(48, 32)
    X = torch.randn(200, 32) @ torch.randn(32, 32)
    st = _stream(X, [50, 50, 100])
    a = factorize_blast(W, 2, 6, steps=10, calib=X)
    b = factorize_blast(W, 2, 6, steps=10, calib=st)
    assert abs(a.output_error - b.output_error) < 1e-4
    torch.testing.assert_close(a.U @ a.U.mT, b.U @ b.U.mT, rtol=1e-3, atol=1e-3)
    p, q = project_ss1(W, 2, 1, calib=X), project_ss1(W, 2, 1, calib=st)
    # (P itself is as well-determined as this ill-conditioned X allows: the errors are what count)
    assert abs(p.output_error - q.output_error) < 1e-4 and abs(p.error - q.error) < 1e-4
    ta, tb = lowrank_spectrum(W, X)[2], lowrank_spectrum(W, st)[2]
    for k in (1, 5, 20):
        assert ta(k) == pytest.approx(tb(k), rel=1e-6)


def test_record_stats_keeps_no_row_matrix():
    from torch import fx

    from structfx.passes.match import match_linears
    from structfx.pipeline import record_stats

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    batches = [(torch.randn(10, 16),) for _ in range(5)]
    gm = fx.symbolic_trace(model)
    sites = match_linears(gm)
    stats = record_stats(gm, sites, batches)
    assert set(stats) == {s.name for s in sites}
    for s in sites:
        st = stats[s.name]
        assert isinstance(st, CalibStats) and st.rows == 50
        assert st.held.shape[0] == 50 // HOLDOUT_EVERY       # only the held-out eighth as rows
    x = torch.cat([b[0] for b in batches])
    assert stats[sites[0].name].digest == calib_digest(x)
