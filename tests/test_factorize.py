"""Dense -> structured: ``factorize_blast`` (BLAST) and ``project_ss1`` (SS1), on CPU.

Small matrices and fixed seeds throughout: every test is deterministic and the file runs in a
few seconds.
"""
import math

import pytest
import torch

from structfx.kernels import ss1_hash
from structfx.kernels.reference import blast_dense_weight
from structfx.passes.calib_stats import split_calib
from structfx.passes.factorize_blast import (BlastFactors, blast_rank_for_params,
                                             factorize_blast)
from structfx.passes.project_ss1 import SS1Factors, project_ss1, ss1_compression_for_params


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_blast(m, n, b1, b2, r, g):
    p, q = -(-m // b1), -(-n // b2)
    U = torch.randn(b1, p, r, generator=g)
    S = torch.randn(b1, b2, r, generator=g)
    V = torch.randn(b2, q, r, generator=g)
    return blast_dense_weight(U, S, V, m, n)


def truncated_svd_error(W, r):
    s = torch.linalg.svdvals(W.double())
    return float(s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())


def anisotropic_inputs(n, rows, g):
    """Inputs with per-channel scales over 3 decades plus a random rotation: strongly
    non-isotropic covariance with cross-block correlations (like real activations)."""
    Z = torch.randn(rows, n, generator=g) * torch.logspace(-1.5, 1.5, n)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    return Z @ Q.T


def output_error(X, W, W_hat):
    return float((X @ (W - W_hat).T).norm() / (X @ W.T).norm())


# ---- BLAST ----------------------------------------------------------------------------------

@pytest.mark.parametrize("m, n, blocks, r", [
    (64, 96, 4, 3),          # blocks divide the sizes
    (128, 128, 4, 16),
    (70, 90, (4, 3), 3),     # they don't: 70 = 4*18 - 2, 90 = 3*30
    (33, 17, 2, 5),
    (9, 20, (8, 3), 2),      # p = 2: the last three block-rows are all padding
])
def test_blast_recovers_exact_blast_matrix(m, n, blocks, r):
    b1, b2 = (blocks, blocks) if isinstance(blocks, int) else blocks
    W = random_blast(m, n, b1, b2, r, gen(1))
    f = factorize_blast(W, blocks, r)
    assert isinstance(f, BlastFactors)
    p, q = -(-m // b1), -(-n // b2)
    assert f.U.shape == (b1, p, r) and f.S.shape == (b1, b2, r) and f.V.shape == (b2, q, r)
    assert f.error < 1e-3
    W_hat = blast_dense_weight(f.U, f.S, f.V, m, n)
    assert float((W - W_hat).norm() / W.norm()) == pytest.approx(f.error, abs=1e-6)
    assert f.output_error is None


def test_blast_with_one_block_matches_truncated_svd():
    g = gen(2)
    # Decaying spectrum, so truncating at rank 8 loses a clear, nonzero amount.
    A = torch.linalg.qr(torch.randn(80, 60, generator=g)).Q
    B = torch.linalg.qr(torch.randn(60, 60, generator=g)).Q
    W = (A * torch.arange(1, 61).float().pow(-0.8)) @ B.T
    best = truncated_svd_error(W, 8)
    assert best > 0.1
    f = factorize_blast(W, 1, 8)
    assert f.error == pytest.approx(best, rel=1e-3)


def block_structured(m, b, g, noise=0.1):
    """Each block gets its own structure: rank 12 on the diagonal, rank 2 off it, plus noise."""
    p = m // b
    W = torch.empty(m, m)
    for i in range(b):
        for j in range(b):
            k = 12 if i == j else 2
            W[i * p:(i + 1) * p, j * p:(j + 1) * p] = (
                torch.randn(p, k, generator=g) @ torch.randn(k, p, generator=g) / math.sqrt(k))
    return W + noise * torch.randn(m, m, generator=g)


def test_blast_beats_truncated_svd_on_block_structured_matrix():
    m, b = 96, 4
    W = block_structured(m, b, gen(3))
    r = blast_rank_for_params(m, m, b, 0.5)
    r_svd = math.floor(0.5 * m * m / (2 * m))
    assert r * (2 * m + b * b) <= m * m * 0.5 and r_svd * 2 * m <= m * m * 0.5
    f = factorize_blast(W, b, r, steps=30)
    svd = truncated_svd_error(W, r_svd)
    assert f.error < 0.5 * svd, (f.error, svd)


@pytest.mark.parametrize("init", ["svd", "random"])
def test_blast_descent_never_increases_error(init):
    # Every sub-step is capped at the minimum of its parabola, so the error can only drop.
    W = torch.randn(48, 64, generator=gen(4))
    start = factorize_blast(W, 4, 6, steps=0, init=init).error
    errs = [factorize_blast(W, 4, 6, steps=s, init=init).error for s in (1, 5, 20)]
    assert all(e <= start + 1e-6 for e in errs)
    assert errs[-1] < 0.9 * start


def test_blast_random_init_reaches_a_good_fit():
    W = block_structured(64, 4, gen(5))
    f = factorize_blast(W, 4, 12, steps=60, init="random")
    assert f.error < 0.3


@pytest.mark.parametrize("rank", [6, 10, 40])
def test_blast_rank_at_least_block_size(rank):
    # 40x24 with 4x4 blocks: p = 10, q = 6, so every rank here is >= min(p, q).
    W = torch.randn(40, 24, generator=gen(6))
    start = factorize_blast(W, 4, rank, steps=0).error
    f = factorize_blast(W, 4, rank, steps=20)
    assert math.isfinite(f.error) and f.error <= start + 1e-6
    assert torch.isfinite(f.U).all() and torch.isfinite(f.S).all() and torch.isfinite(f.V).all()
    if rank == 40:  # more parameters than entries: an exact fit exists and is found
        assert f.error < 1e-3


def test_blast_unit_norm_columns_and_same_product():
    W = torch.randn(40, 56, generator=gen(7))
    f = factorize_blast(W, (4, 2), 5, steps=10)
    assert torch.allclose(f.U.norm(dim=1), torch.ones(4, 5), atol=1e-5)
    assert torch.allclose(f.V.norm(dim=1), torch.ones(2, 5), atol=1e-5)
    W_hat = blast_dense_weight(f.U, f.S, f.V, 40, 56)
    assert float((W - W_hat).norm() / W.norm()) == pytest.approx(f.error, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_blast_returns_fp32_on_input_device(dtype):
    W = torch.randn(32, 48, generator=gen(8)).to(dtype)
    f = factorize_blast(W, 2, 4, steps=3)
    for t in (f.U, f.S, f.V):
        assert t.dtype == torch.float32 and t.device == W.device
    assert 0 < f.error < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blast_on_cuda():
    W = random_blast(64, 96, 4, 4, 3, gen(9)).cuda()
    f = factorize_blast(W, 4, 3, calib=torch.randn(64, 96, device="cuda"))
    assert f.U.device == W.device and f.U.dtype == torch.float32
    assert f.error < 1e-3


def test_blast_zero_matrix():
    f = factorize_blast(torch.zeros(8, 12), 2, 2, steps=3)
    assert f.error == 0.0 and torch.count_nonzero(f.S) == 0


def test_blast_data_aware_beats_data_free_on_held_out_rows():
    g = gen(10)
    m, n, b = 64, 96, 4
    W = torch.randn(m, n, generator=g)
    X = anisotropic_inputs(n, 1024, g).reshape(4, 256, n)   # leading dims are flattened
    r = blast_rank_for_params(m, n, b, 0.5)
    aware = factorize_blast(W, b, r, steps=30, calib=X)
    free = factorize_blast(W, b, r, steps=30)
    _, held = split_calib(X.reshape(-1, n))
    assert len(held) == 128
    free_out = output_error(held, W, blast_dense_weight(free.U, free.S, free.V, m, n))
    aware_out = output_error(held, W, blast_dense_weight(aware.U, aware.S, aware.V, m, n))
    assert aware.output_error == pytest.approx(aware_out, rel=1e-4)
    assert aware.output_error < 0.5 * free_out, (aware.output_error, free_out)
    # The price: a worse fit of the weight itself in directions the inputs don't excite.
    assert aware.error > free.error


def test_blast_progress_bar(capsys):
    factorize_blast(torch.randn(16, 16, generator=gen(11)), 2, 2, steps=3, progress=True)
    assert "BLAST factorize" in capsys.readouterr().err


def test_blast_rank_for_params():
    assert blast_rank_for_params(128, 256, (4, 2), 0.5) == math.floor(0.5 * 128 * 256 / 392)
    assert blast_rank_for_params(4096, 4096, 16, 0.5) == 992
    assert blast_rank_for_params(8, 8, 2, 1e-3) == 1
    with pytest.raises(ValueError, match="params"):
        blast_rank_for_params(8, 8, 2, 0.0)


W_OK = torch.randn(16, 24)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight=torch.randn(16)), "2-D"),
    (dict(weight=torch.randn(2, 16, 24)), "2-D"),
    (dict(weight=torch.ones(16, 24, dtype=torch.int64)), "wrong dtype"),
    (dict(weight=torch.full((16, 24), float("nan"))), "NaN or inf"),
    (dict(weight=torch.full((16, 24), float("inf"))), "NaN or inf"),
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(blocks=0), "blocks must be >= 1"),
    (dict(blocks=(2, -1)), "blocks must be >= 1"),
    (dict(blocks=17), "can't fit"),
    (dict(blocks=(2, 25)), "can't fit"),
    (dict(blocks=(1, 2, 3)), "pair of ints"),
    (dict(steps=-1), "steps"),
    (dict(calib=torch.randn(10, 23)), "calib must have last dim 24"),
    (dict(calib=torch.randn(1, 24)), "at least 2 rows"),
    (dict(init="zeros"), "init"),
])
def test_blast_bad_config_raises(kwargs, match):
    args = dict(weight=W_OK, blocks=2, rank=2, steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        factorize_blast(args.pop("weight"), args.pop("blocks"), args.pop("rank"), **args)


# ---- SS1 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("N, K, c, block_k, block_n", [
    (128, 256, 2, 32, 64),   # everything divides
    (100, 70, 3, 16, 24),    # neither K nor N is a multiple of the blocks
    (50, 72, 2, 32, 64),     # K_red = 64 but only 8 rows feed the second parameter chunk
    (64, 64, 1, 32, 64),     # c = 1: dense
])
def test_ss1_projection_of_ss1_matrix_is_exact(N, K, c, block_k, block_n):
    K_red = ss1_hash.reduced_k(K, c, block_k)
    P = torch.randn(N, K_red, generator=gen(20))
    W = ss1_hash.dense_weight(P, K, c, 7, block_k, block_n).t()       # nn.Linear layout
    f = project_ss1(W, c, seed=7, block_k=block_k, block_n=block_n)
    assert isinstance(f, SS1Factors) and f.P.shape == (N, K_red)
    assert f.error < 1e-6 and f.output_error is None
    used = torch.zeros(N * K_red, dtype=torch.bool)
    used[ss1_hash.weight_index(K, N, c, 7, block_k, block_n).reshape(-1)] = True
    assert torch.allclose(f.P.reshape(-1)[used], P.reshape(-1)[used], atol=1e-5)
    assert torch.count_nonzero(f.P.reshape(-1)[~used]) == 0          # padding-only parameters


def test_ss1_unused_parameters_exist_in_padded_case():
    # Guards the previous test: the (50, 72, c=2) case really has padding-only parameters.
    idx = ss1_hash.weight_index(72, 50, 2, 7, 32, 64)
    assert idx.unique().numel() < 50 * ss1_hash.reduced_k(72, 2, 32)


@pytest.mark.parametrize("c", [1, 2, 4, 8])
def test_ss1_projection_error_of_gaussian_weight(c):
    # Each parameter is the mean of c i.i.d. entries: it keeps 1/c of their energy, so the
    # relative error is sqrt(1 - 1/c) (0 for the dense c = 1).
    W = torch.randn(256, 512, generator=gen(21))
    f = project_ss1(W, c)
    assert f.error == pytest.approx(math.sqrt(1 - 1 / c), abs=0.01)


def test_ss1_projection_is_least_squares_optimal():
    W = torch.randn(70, 90, generator=gen(22))
    f = project_ss1(W, 3, seed=1)
    g = gen(23)
    for _ in range(3):
        P = f.P + 1e-2 * torch.randn(f.P.shape, generator=g)
        W_hat = ss1_hash.dense_weight(P, 90, 3, 1).t()
        assert float((W - W_hat).norm() / W.norm()) > f.error


def test_ss1_data_aware_solves_the_ridge_problem():
    # Independent check on a tiny layer: build each output column's design matrix from the
    # linearity of dense_weight in P and solve the same ridge problem with lstsq.
    N, K, c, bk, bn = 6, 20, 2, 8, 4
    g = gen(24)
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    X = torch.randn(64, K, generator=g, dtype=torch.float64)
    ridge = 1e-2
    f = project_ss1(W, c, seed=3, calib=X, block_k=bk, block_n=bn, ridge=ridge)
    f0 = project_ss1(W, c, seed=3, block_k=bk, block_n=bn)
    train, _ = split_calib(X)
    K_red = ss1_hash.reduced_k(K, c, bk)
    idx = ss1_hash.weight_index(K, N, c, 3, bk, bn)
    for n in range(N):
        E = torch.zeros(K, K_red, dtype=torch.float64)
        E[torch.arange(K), idx[:, n] - n * K_red] = 1.0                # W[:, n] = E @ P[n]
        D = train @ E                                                  # (rows, K_red)
        # lam as the projection sets it: relative to the mean diagonal of the block's Gram.
        lam = ridge * (D * D).sum(0).mean()
        A = torch.cat([D, lam.sqrt() * torch.eye(K_red, dtype=torch.float64)])
        y = torch.cat([train @ W[n], lam.sqrt() * f0.P[n].double()])
        expected = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
        assert torch.allclose(f.P[n].double(), expected, atol=1e-4), n


def test_ss1_data_aware_beats_data_free_on_held_out_rows():
    g = gen(25)
    N, K, c = 96, 160, 2
    W = torch.randn(N, K, generator=g)
    X = anisotropic_inputs(K, 2048, g)
    aware = project_ss1(W, c, seed=0, calib=X)
    free = project_ss1(W, c, seed=0)
    _, held = split_calib(X)
    W_free = ss1_hash.dense_weight(free.P, K, c, 0).t()
    W_aware = ss1_hash.dense_weight(aware.P, K, c, 0).t()
    assert aware.output_error == pytest.approx(output_error(held, W, W_aware), rel=1e-4)
    assert aware.output_error < 0.5 * output_error(held, W, W_free)
    assert aware.error > free.error                    # free is the weight-space optimum


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_ss1_returns_fp32_on_input_device(dtype):
    W = torch.randn(40, 64, generator=gen(26)).to(dtype)
    for calib in (None, torch.randn(32, 64, generator=gen(27)).to(dtype)):
        f = project_ss1(W, 2, calib=calib)
        assert f.P.dtype == torch.float32 and f.P.device == W.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ss1_on_cuda():
    W = torch.randn(40, 64, device="cuda")
    f = project_ss1(W, 2, calib=torch.randn(32, 64, device="cuda"))
    assert f.P.device == W.device and f.P.dtype == torch.float32


def test_ss1_compression_for_params():
    assert [ss1_compression_for_params(p) for p in (1.0, 0.5, 0.3, 0.25, 0.9, 2.0)] == \
        [1, 2, 3, 4, 1, 1]
    with pytest.raises(ValueError, match="params"):
        ss1_compression_for_params(-0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight=torch.randn(16)), "2-D"),
    (dict(weight=torch.ones(16, 24, dtype=torch.int32)), "wrong dtype"),
    (dict(weight=torch.full((16, 24), float("nan"))), "NaN or inf"),
    (dict(compression=0), "compression must be an integer >= 1"),
    (dict(compression=1.5), "compression must be an integer >= 1"),
    (dict(compression=True), "compression must be an integer >= 1"),
    (dict(calib=torch.randn(10, 16)), "calib must have last dim 24"),
    (dict(block_k=12), "block_k"),
    (dict(ridge=0.0), "ridge"),
])
def test_ss1_bad_config_raises(kwargs, match):
    args = dict(weight=torch.randn(16, 24), compression=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        project_ss1(args.pop("weight"), args.pop("compression"), **args)


@pytest.mark.parametrize("b1,b2,r", [(1, 3, 4), (3, 2, 5), (4, 4, 7)])
def test_descent_contractions_match_einsum(b1, b2, r):
    """The descent's block contractions (loops / batched GEMMs for speed) against the plain
    einsum they replace."""
    from structfx.passes.factorize_blast import (_coupled_matvec, _coupled_sandwich,
                                                 _pair_sandwich, _sandwich_sum)

    g = torch.Generator().manual_seed(b1 * 100 + b2 * 10 + r)
    S = torch.randn(b1, b2, r, generator=g, dtype=torch.float64)
    GV = torch.randn(b2, r, r, generator=g, dtype=torch.float64)
    GU = torch.randn(b1, r, r, generator=g, dtype=torch.float64)
    M = torch.randn(b2, b2, r, r, generator=g, dtype=torch.float64)
    x = torch.randn(b1, b2, r, generator=g, dtype=torch.float64)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    close(_sandwich_sum(S, GV, over=1), torch.einsum("ijr,jrs,ijs->irs", S, GV, S))
    close(_sandwich_sum(S, GU, over=0), torch.einsum("ijr,irs,ijs->jrs", S, GU, S))
    close(_coupled_sandwich(S, M), torch.einsum("ikr,kjrs,ijs->irs", S, M, S))
    close(_pair_sandwich(S, GU), torch.einsum("ikr,irs,ijs->kjrs", S, GU, S))
    close(_coupled_matvec(GU, x, M.permute(2, 0, 1, 3).flatten(2)),
          torch.einsum("ikrs,jkrs->ijr", GU[:, None] * x[..., None, :], M))


def test_pcg_shift_solves_the_damped_system():
    from structfx.passes.spd_solve import pcg_solve

    g = torch.Generator().manual_seed(0)
    B = torch.randn(5, 6, 6, generator=g, dtype=torch.float64)
    A = B @ B.mT
    rhs = torch.randn(5, 6, generator=g, dtype=torch.float64)
    shift = torch.rand(5, 1, generator=g, dtype=torch.float64) + 0.5
    want = torch.linalg.solve(A + shift[..., None] * torch.eye(6, dtype=A.dtype), rhs)
    torch.testing.assert_close(pcg_solve(A, rhs, rtol=1e-12, shift=shift), want,
                               rtol=1e-8, atol=1e-8)


def test_s_step_systems_chunked_equal_formed():
    from structfx.passes.factorize_blast import _HadamardStack
    from structfx.passes.spd_solve import pcg_solve

    g = torch.Generator().manual_seed(3)
    U = torch.randn(5, 9, 6, generator=g, dtype=torch.float64)
    V = torch.randn(3, 7, 6, generator=g, dtype=torch.float64)
    x = torch.randn(5, 3, 6, generator=g, dtype=torch.float64)
    GU, GV = U.mT @ U, V.mT @ V
    formed, chunked = _HadamardStack(GU, GV), _HadamardStack(GU, GV, limit=1)
    assert formed.full is not None and chunked.full is None and chunked.step == 1
    dense = GU[:, None] * GV[None]
    torch.testing.assert_close(chunked(x), (dense @ x[..., None]).squeeze(-1))
    torch.testing.assert_close(formed(x), chunked(x))
    torch.testing.assert_close(chunked.diag, dense.diagonal(dim1=-2, dim2=-1))
    a = pcg_solve(dense, x, rtol=1e-12, shift=0.1)
    b = pcg_solve(chunked, x, rtol=1e-12, shift=0.1, diag=chunked.diag)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="diag="):
        pcg_solve(chunked, x)


@pytest.mark.parametrize("b1,b2,p,q", [(3, 2, 5, 4), (2, 4, 3, 6), (4, 4, 2, 2)])
def test_descent_products_match_blocks(b1, b2, p, q):
    """The U step's right-hand side (a GEMM per block-row, or per-block products, whichever is
    smaller) and the transposed problem's products against the per-block definition."""
    from structfx.passes.factorize_blast import _Gram

    g = torch.Generator().manual_seed(b1 * 1000 + b2 * 100 + p * 10 + q)
    r = 3
    Wb = torch.randn(b1, b2, p, q, generator=g, dtype=torch.float64)
    U = torch.randn(b1, p, r, generator=g, dtype=torch.float64)
    S = torch.randn(b1, b2, r, generator=g, dtype=torch.float64)
    V = torch.randn(b2, q, r, generator=g, dtype=torch.float64)
    gram = _Gram(Wb, None)
    want = torch.einsum("ijpq,jqr,ijr->ipr", Wb, V, S)
    torch.testing.assert_close(gram.BU(V, S), want, rtol=1e-12, atol=1e-12)
    t = gram.transposed()
    assert t.shape == (b2, b1, q, p)
    torch.testing.assert_close(t.YtU(V), torch.einsum("ijpq,jqr->jipr", Wb, V))
    torch.testing.assert_close(t.BU(U, S.transpose(0, 1)), torch.einsum("ijpq,ipr,ijr->jqr",
                                                                         Wb, U, S))


@pytest.mark.parametrize("shape,b", [((96, 32), 4), ((32, 96), 4), ((48, 48), (2, 3))])
def test_descent_tracked_error_is_exact(shape, b):
    """The descent tracks its objective through each sub-step's parabola (the S step's
    curvature from CG's orthogonality, no product): after any number of steps the tracked
    error equals the error recomputed from the factors, for tall (solved as is) and wide
    (solved transposed) layers."""
    from structfx.passes import factorize_blast as fb

    W = torch.randn(*shape, generator=gen(11), dtype=torch.float64)
    b1, b2 = (b, b) if isinstance(b, int) else b
    prob = fb._prepare(W, b1, b2, None)
    U, S, V = fb._start(prob, 7, "svd", 0)
    curve: list = []
    U, S, V = fb._descend(prob.Wb, U, S, V, 12, fb.DEFAULT_LR, None, curve=curve)
    assert U.shape == (b1, prob.Wb.shape[2], 7) and V.shape == (b2, prob.Wb.shape[3], 7)
    exact = fb._finish(prob, U, S, V, W).error
    assert len(curve) == 12 and curve == sorted(curve, reverse=True)
    assert abs(curve[-1] - exact) < 1e-9 * max(exact, 1.0), (curve[-1], exact)


def test_wide_and_tall_layers_factorize_alike():
    """Data-free, W and W^T are the same problem: the wide layer (solved transposed) reaches
    the tall layer's error, up to which local optimum each run ends in (the starts differ:
    +-1 % measured on three seeds)."""
    from structfx.passes.factorize_blast import DEFAULT_TOL

    W = torch.randn(128, 48, generator=gen(12))
    tall = factorize_blast(W, 4, 10, steps=300, tol=DEFAULT_TOL)
    wide = factorize_blast(W.T.contiguous(), 4, 10, steps=300, tol=DEFAULT_TOL)
    assert abs(tall.error - wide.error) < 0.02 * tall.error, (tall.error, wide.error)


@pytest.mark.parametrize("aware", [False, True])
def test_accelerated_descent_is_exact_and_ahead(aware):
    """The extrapolation before each sweep is kept only where it lowers the objective, which
    it takes from the U step's products: the tracked objective stays the exact one (data-free
    and with the cross-block covariance), and after the same number of steps the accelerated
    descent is ahead of the plain one."""
    from structfx.passes import factorize_blast as fb

    W = torch.randn(96, 64, generator=gen(21), dtype=torch.float64)
    X = None
    if aware:   # anisotropic inputs, so C is far from the identity
        X = torch.randn(400, 64, generator=gen(22), dtype=torch.float64) * \
            torch.logspace(0, -1.5, 64, dtype=torch.float64)
    prob = fb._prepare(W, 4, 4, X)
    U0, S0, V0 = fb._start(prob, 10, "svd", 0)
    ends = {}
    for acc in (False, True):
        curve: list = []
        U, S, V = fb._descend(prob.Wb, U0, S0, V0, 40, fb.DEFAULT_LR, prob.C, curve=curve,
                              accelerate=acc)
        f = fb._objective(prob.Wb, U, S, V, prob.C)
        w = fb._objective(prob.Wb, 0 * U, S, V, prob.C)        # 1/2 ||W||_C^2
        assert abs(curve[-1] - (f / w) ** 0.5) < 1e-8, (acc, curve[-1], (f / w) ** 0.5)
        assert curve == sorted(curve, reverse=True)
        ends[acc] = curve[-1]
    assert ends[True] < 0.99 * ends[False], ends


def test_anchor_ranks_are_the_top_and_two_thirds_of_it():
    from structfx.passes.factorize_blast import anchor_ranks

    assert anchor_ranks([10, 20]) == [10, 20]
    assert anchor_ranks([30, 10, 20, 10]) == [20, 30]
    assert anchor_ranks([12, 25, 37, 50, 62, 75]) == [50, 75]


def test_rank_interpolation_recovers_an_effective_rank_law():
    """Errors that follow the truncated SVD at g(r) r with g linear in r are reproduced
    exactly from two anchors; g = 1 is low rank itself. Anchors that can't define g give None."""
    from structfx.passes.factorize_blast import interpolate_ranks

    s = torch.linspace(3.0, 0.1, 200, dtype=torch.float64) ** 1.5
    energy = s.pow(2)

    def tail(k: float) -> float:          # continuous-rank truncated-SVD error
        i = int(k)
        kept = energy[:i].sum() + (k - i) * energy[i]
        return float(((energy.sum() - kept) / energy.sum()).sqrt())

    g = lambda r: 1.1 + 0.004 * r
    anchors = {40: tail(g(40) * 40), 60: tail(g(60) * 60)}
    got = interpolate_ranks(s, anchors, [10, 25, 50])
    for r in (10, 25, 50):
        assert got[r] == pytest.approx(tail(g(r) * r), rel=1e-9), r
    low = interpolate_ranks(s, {40: tail(40), 60: tail(60)}, [20])
    assert low[20] == pytest.approx(tail(20), rel=1e-9)
    assert interpolate_ranks(s, {40: 0.5, 60: 0.6}, [50]) is None       # not falling
    assert interpolate_ranks(s, {40: 0.5, 60: 0.0}, [50]) is None       # exact fit
