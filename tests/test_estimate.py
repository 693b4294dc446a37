"""Estimate pass: spectral prices of every candidate, checked against direct computations."""
import math

import pytest
import torch

from structfx.passes.estimate import estimate_candidates, lowrank_spectrum
from structfx.passes.factorize import lowrank_factors
from structfx.passes.calib_stats import split_calib
from structfx.passes.factorize_blast import (DEFAULT_TOL, blast_error_curve,
                                             blast_rank_for_params, factorize_blast)
from structfx.kernels.reference import blast_dense_weight


def _weight(m=96, n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    # decaying spectrum, like a trained layer
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.logspace(0, -1.5, min(m, n))
    return (U[:, : len(s)] * s) @ V[:, : len(s)].T


def _calib(n=80, rows=600, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g) * torch.logspace(0, -2, n)


@pytest.mark.parametrize("k", [1, 7, 40, 80])
def test_lowrank_errors_are_exact_for_every_rank_data_free(k):
    W = _weight()
    A, B, tails = lowrank_spectrum(W)
    U, s, Vh = torch.linalg.svd(W.double())
    ref = (U[:, :k] * s[:k]) @ Vh[:k]
    err, out = tails(k)
    assert out is None
    assert err == pytest.approx(float((W.double() - ref).norm() / W.double().norm()), abs=1e-9)
    assert torch.allclose(A[:, :k] @ B[:, :k].T, ref, atol=1e-9)


@pytest.mark.parametrize("k", [3, 20, 60])
def test_lowrank_errors_are_exact_for_every_rank_data_aware(k):
    W, X = _weight(), _calib()
    _, held = split_calib(X.double())
    A, B, tails = lowrank_spectrum(W, X)
    W_hat = A[:, :k] @ B[:, :k].T
    Wd = W.double()
    we, he = tails(k)
    assert we == pytest.approx(float((Wd - W_hat).norm() / Wd.norm()), rel=1e-6)
    ref = float((held @ (Wd - W_hat).T).norm() / (held @ Wd.T).norm())
    assert he == pytest.approx(ref, rel=1e-6)


def test_data_aware_lowrank_is_output_optimal_on_fit_rows():
    """Against the plain truncated SVD and random rank-k perturbations of the whitened one."""
    W, X = _weight(), _calib()
    fit, _ = split_calib(X.double())
    k = 10
    A, B, _ = lowrank_spectrum(W, X)
    best = A[:, :k] @ B[:, :k].T
    Wd = W.double()

    def fit_err(W_hat):
        return float((fit @ (Wd - W_hat).T).norm())

    U, s, Vh = torch.linalg.svd(Wd)
    assert fit_err(best) < fit_err((U[:, :k] * s[:k]) @ Vh[:k])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        dA = 1e-3 * torch.randn(A[:, :k].shape, generator=g, dtype=torch.float64)
        assert fit_err(best) <= fit_err((A[:, :k] + dA) @ B[:, :k].T) + 1e-12


def test_lowrank_factors_are_the_truncated_svd():
    W = _weight()
    f = lowrank_factors(W, 12)
    U, s, Vh = torch.linalg.svd(W.double())
    ref = (U[:, :12] * s[:12]) @ Vh[:12]
    W_hat = blast_dense_weight(f.U, f.S, f.V, *W.shape).double()
    assert torch.allclose(W_hat, ref, atol=1e-5)
    assert f.error == pytest.approx(float((W.double() - ref).norm() / W.double().norm()), rel=1e-6)


def test_lowrank_with_rank_deficient_calibration_does_not_fail():
    """A CLS-only head sees fewer rows than inputs: its Gram is singular."""
    W = _weight(64, 128)
    X = torch.randn(40, 128)          # 35 fit rows for 128 inputs
    A, B, tails = lowrank_spectrum(W, X)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    we, he = tails(16)
    assert math.isfinite(we) and math.isfinite(he)
    f = factorize_blast(W, 4, 16, steps=5, calib=X)           # BLAST's output-aware start too
    assert math.isfinite(f.error) and math.isfinite(f.output_error)


@pytest.mark.parametrize("shape,b", [((256, 128), 4), ((384, 96), 8)])
def test_blast_curve_predicts_the_converged_factorization(shape, b):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))   # like bench's MLP
    ranks = [blast_rank_for_params(*shape, b, f) for f in (0.25, 0.5, 0.75)]
    curve = blast_error_curve(W, b, ranks, steps=10)
    for r, (est, out) in zip(ranks, curve):
        final = factorize_blast(W, b, r, steps=300, tol=DEFAULT_TOL).error
        short = factorize_blast(W, b, r, steps=10).error
        assert out is None
        # the target: within 10 % of the converged error, and closer than 10 steps
        assert abs(est / final - 1) <= 0.10, (r, est, short, final)
        assert abs(est - final) < abs(short - final), (r, est, short, final)
    assert curve[0][0] > curve[1][0] > curve[2][0]   # more rank, less error


def test_blast_curve_is_closer_than_the_short_run_on_a_slow_tail():
    # A decaying spectrum with more rank than the 32 x 8 blocks: the descent's tail is slower
    # than the power law the extrapolation assumes, so the estimate stays above the final,
    # but closer to it than the plain short run.
    W = _weight(256, 64)
    ranks = [blast_rank_for_params(256, 64, 8, f) for f in (0.5, 0.75)]
    for r, (est, _) in zip(ranks, blast_error_curve(W, 8, ranks, steps=10)):
        final = factorize_blast(W, 8, r, steps=300, tol=DEFAULT_TOL).error
        short = factorize_blast(W, 8, r, steps=10, init="svd").error
        assert final * 0.98 <= est < short, (r, est, short, final)


def test_tail_extrapolation_follows_a_power_law():
    from structfx.passes.factorize_blast import TAIL_ALPHA, TAIL_STEPS, extrapolate_tail

    e_inf, A = 0.3, 0.5
    curve = [e_inf + A * t ** -TAIL_ALPHA for t in range(1, 16)]
    want = e_inf + A * TAIL_STEPS ** -TAIL_ALPHA
    assert extrapolate_tail(curve[-1], curve) == pytest.approx(want)
    assert extrapolate_tail(0.5, [0.9, 0.7, 0.6, 0.5]) == 0.5           # too short to say
    assert extrapolate_tail(0.1, [1.0] * 9 + [0.1]) == 0.05              # never below half


def test_estimate_candidates_prices_every_candidate():
    from structfx.passes.cost_model import CostModel, device_profile
    from structfx.config import Config

    W, X = _weight(), _calib()
    model = CostModel(device_profile("H100 SXM"))
    cands = model.candidates(96, 80, 64, Config(structure="auto", force=True, blocks=(1, 2)))
    ests = estimate_candidates(W, cands, seed=0, ss1_seed=1, steps=5, calib=X)
    assert len(ests) == len(cands) and ests[0].weight_error == 0
    assert all(math.isfinite(e.weight_error) and e.output_error is not None for e in ests[1:])
    assert all(e.price == e.output_error for e in ests)
    free = estimate_candidates(W, cands, seed=0, ss1_seed=1, steps=5)
    assert all(e.output_error is None and e.price == e.weight_error for e in free)


def test_blend_gram_interpolates_between_the_calibration_and_the_identity():
    from structfx.passes.factorize_blast import blend_gram

    X = _calib(n=12, rows=50).double()
    C = X.T @ X
    s = float(C.diagonal().mean())
    assert torch.equal(blend_gram(C, 0.0), C)
    torch.testing.assert_close(blend_gram(C, 1.0), s * torch.eye(12, dtype=C.dtype))
    torch.testing.assert_close(blend_gram(C, 0.3), 0.7 * C + 0.3 * s * torch.eye(12, dtype=C.dtype))


def test_full_blend_is_the_data_free_truncated_svd():
    W, X = _weight(), _calib()
    k = 12
    A, B, tails = lowrank_spectrum(W, X, blend=1.0)
    U, s, Vh = torch.linalg.svd(W.double())
    torch.testing.assert_close(A[:, :k] @ B[:, :k].T, (U[:, :k] * s[:k]) @ Vh[:k],
                               rtol=1e-6, atol=1e-8)
    assert tails(k)[0] == pytest.approx(float(s[k:].norm() / s.norm()), rel=1e-6)


@pytest.mark.parametrize("blend", [0.1, 0.5])
def test_blended_lowrank_is_optimal_for_the_blended_objective(blend):
    """The blended fit beats both ends (pure calibration, pure weight) on its own objective
    (1 - a) ||X R^T||^2 / mean||x||^2 + a ||R||^2, computed directly."""
    W, X = _weight(), _calib()
    fit, _ = split_calib(X.double())
    Wd, k = W.double(), 10
    scale = float((fit.T @ fit).diagonal().mean())

    def objective(W_hat):
        R = Wd - W_hat
        return (1 - blend) * float((fit @ R.T).pow(2).sum()) / scale + blend * float(R.pow(2).sum())

    got = {a: lowrank_spectrum(W, X, blend=a)[:2] for a in (0.0, blend, 1.0)}
    mine = objective(got[blend][0][:, :k] @ got[blend][1][:, :k].T)
    for a in (0.0, 1.0):
        assert mine < objective(got[a][0][:, :k] @ got[a][1][:, :k].T) * (1 - 1e-6)


def test_blast_with_full_blend_fits_the_weight_like_the_data_free_one():
    W, X = _weight(), _calib()
    free = factorize_blast(W, 4, 12, steps=40)
    full = factorize_blast(W, 4, 12, steps=40, calib=X, blend=1.0)
    aware = factorize_blast(W, 4, 12, steps=40, calib=X)
    assert full.error == pytest.approx(free.error, rel=0.05)
    assert aware.error > 1.2 * full.error          # the calibration fit gives up weight error
    assert aware.output_error < full.output_error  # ... for the output error it is fit on
