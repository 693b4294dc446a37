"""spd_solve (the factorizations' batched Gram solves) against torch.linalg.solve, and the
multi-threaded batched case that hangs in MKL's batched LU."""
import subprocess
import sys
import textwrap

import pytest
import torch

from structfx.passes.spd_solve import spd_solve


def _spd(*shape, n, dtype=torch.float64):
    A = torch.randn(*shape, n, n, dtype=dtype)
    return A @ A.mT + 0.1 * torch.eye(n, dtype=dtype)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_matches_linalg_solve(batch):
    torch.manual_seed(0)
    A = _spd(*batch, n=7)
    B = torch.randn(*batch, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(spd_solve(A, B), torch.linalg.solve(A, B))
    Bt = torch.randn(*batch, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(spd_solve(A, Bt, left=False),
                               torch.linalg.solve(A, Bt, left=False))
    if batch:
        v = torch.randn(*batch, 7, dtype=torch.float64)
        torch.testing.assert_close(spd_solve(A, v), torch.linalg.solve(A, v))


def test_broadcast_rhs_batch():
    torch.manual_seed(1)
    A = _spd(4, n=6)
    B = torch.randn(6, 2, dtype=torch.float64)
    torch.testing.assert_close(spd_solve(A, B), torch.linalg.solve(A, B))


def test_indefinite_element_falls_back_to_lu():
    torch.manual_seed(2)
    A = _spd(3, n=5)
    A[1] = torch.diag(torch.tensor([1.0, -2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    B = torch.randn(3, 5, 2, dtype=torch.float64)
    X = spd_solve(A, B)
    assert torch.isfinite(X).all()
    torch.testing.assert_close(A @ X, B)


def test_large_batched_solve_with_two_threads_returns():
    # Batched LU of > ~150 x 150 matrices never returns with 2 MKL threads (torch 2.13 CPU);
    # factorize_blast at rank 160 solves (2, 2, 160, 160) stacks. Run in a child process so a
    # regression fails by timeout instead of hanging the suite.
    code = textwrap.dedent("""
        import torch, structfx
        torch.set_num_threads(2)
        torch.manual_seed(0)
        W = torch.randn(768, 384)
        f = structfx.factorize_blast(W, blocks=2, rank=160, steps=2)
        assert torch.isfinite(f.U).all() and f.error < 1.0, f.error
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("batch,n", [((), 5), ((4,), 30), ((3, 5), 64)])
def test_pcg_matches_linalg_solve(batch, n):
    """Hadamard-product Grams plus a ridge, as the BLAST S step solves them."""
    from structfx.passes.spd_solve import pcg_solve

    torch.manual_seed(1)
    U, V = torch.randn(*batch, 2 * n, n, dtype=torch.float64), torch.randn(2 * n, n,
                                                                           dtype=torch.float64)
    A = (U.mT @ U) * (V.mT @ V) + 1e-2 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(*batch, n, dtype=torch.float64)
    torch.testing.assert_close(pcg_solve(A, b, rtol=1e-12), torch.linalg.solve(A, b),
                               rtol=1e-8, atol=1e-10)


def test_pcg_stopped_early_is_still_a_descent_direction():
    """Cut off after one iteration on a badly conditioned system, the answer still lowers the
    quadratic model 1/2 x^T A x - b^T x (what the descent's line search needs)."""
    from structfx.passes.spd_solve import pcg_solve

    torch.manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    A = (Q * torch.logspace(0, 6, 40, dtype=torch.float64)) @ Q.mT
    b = torch.randn(40, dtype=torch.float64)
    x = pcg_solve(A, b, max_iter=1)
    assert float(0.5 * x @ A @ x - b @ x) < 0
    assert not torch.allclose(x, torch.linalg.solve(A, b))
