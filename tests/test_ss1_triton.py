"""SS1 Triton kernels (kernels/ss1_triton.py) on CPU through the Triton interpreter.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. The oracle is
``ss1_linear_reference`` in fp64 on the same (rounded) inputs; backward is checked against
autograd through it. Shapes are small (interpreter speed); they cover K / N that are and are not
multiples of c*BK / BN, non-power-of-two BK / BN, BN > 128 (several N tiles per block) and
token counts below and across the interpreter's 32-row token tile.
"""
import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structfx.kernels import ss1_hash, ss1_triton
from structfx.kernels.reference import ss1_linear_reference
from structfx.kernels.ss1_triton import (ss1_backward_triton, ss1_forward_triton,
                                         ss1_linear_backward_cuda, ss1_linear_cuda)


@pytest.fixture(autouse=True, scope="module")
def _fast_interpreter():
    """The interpreter re-runs every int32 op in int64 to "sanitize" overflow, then drops the
    check unless its debug option is on: a 3-4x slowdown for nothing. Switch it off here only."""
    from triton.runtime import interpreter
    builder = getattr(interpreter, "interpreter_builder", None)
    opts = getattr(builder, "options", None)
    if opts is None or not hasattr(opts, "sanitize_overflow") or opts.debug:
        yield
        return
    builder.options = dataclasses.replace(opts, sanitize_overflow=False)
    try:
        yield
    finally:
        builder.options = opts


def rel_max(a, ref, scale=None):
    """Largest error over the largest ``scale`` entry (default: ``ref``). Pass the same
    product on absolute values as ``scale`` (the sum of |terms|, what bounds rounding) so an
    output that cancels to near zero cannot fail a correct kernel."""
    scale = ref if scale is None else scale
    return ((a.double() - ref).abs().max() / scale.abs().max()).item()


def rel_fro(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def make(T, K, N, c, bk, bn, bias, seed, dtype=torch.float32):
    """Inputs in ``dtype`` and their exact fp64 copies (the reference sees the rounded values)."""
    g = torch.Generator().manual_seed(seed * 7919 + T * 131 + K * 17 + N)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = mk(T, K)
    P = mk(N, ss1_hash.reduced_k(K, c, bk))
    b = mk(N) if bias else None
    return x, P, b


def reference(x, P, b, c, seed, bk, bn):
    return ss1_linear_reference(x.double(), P.double(), None if b is None else b.double(),
                                c, seed, bk, bn)


def reference_grads(x, P, b, dy, c, seed, bk, bn):
    xr = x.double().requires_grad_()
    Pr = P.double().requires_grad_()
    br = None if b is None else b.double().requires_grad_()
    ss1_linear_reference(xr, Pr, br, c, seed, bk, bn).backward(dy.double())
    return xr.grad, Pr.grad, dy.double().sum(0) if br is None else br.grad


def run_forward(x, P, b, c, seed, bk, bn):
    return ss1_forward_triton(x, P, b, c, ss1_hash.hash_coeffs(seed), bk, bn)


def absolute(*ts):
    return [None if t is None else t.abs() for t in ts]


def check_case(T, K, N, c, bk, bn, bias, seed, backward=False):
    """fp32 kernels vs the fp64 reference: error < 1e-5 of the largest sum of |terms|."""
    x, P, b = make(T, K, N, c, bk, bn, bias, seed)
    y = run_forward(x, P, b, c, seed, bk, bn)
    assert y.shape == (T, N) and y.dtype == torch.float32
    scale = reference(*absolute(x, P, b), c, seed, bk, bn)
    assert rel_max(y, reference(x, P, b, c, seed, bk, bn), scale) < 1e-5
    if backward:
        dy = torch.randn(T, N, generator=torch.Generator().manual_seed(seed + 1),
                         dtype=torch.float64).float()
        got = ss1_backward_triton(dy, x, P, b, c, ss1_hash.hash_coeffs(seed), bk, bn,
                                  (True, True, True))
        want = reference_grads(x, P, b, dy, c, seed, bk, bn)
        scales = reference_grads(*absolute(x, P, b, dy), c, seed, bk, bn)
        for name, g, w, sc in zip(("dx", "dP", "dbias"), got, want, scales):
            assert g.shape == w.shape and g.dtype == torch.float32, name
            assert rel_max(g, w, sc) < 1e-5, name


# (K, N, BK, BN) per compression: first aligned (K = 2*c*BK, N = 2*BN), then not.
def shapes(c):
    return [(2 * c * 16, 64, 16, 32), (2 * c * 16 - 7, 53, 16, 16)]


# ----------------------------------------------------------------------------- forward fp32
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("c", [1, 2, 3, 4])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_fp32_matches_reference(T, c, aligned, bias):
    K, N, bk, bn = shapes(c)[0 if aligned else 1]
    check_case(T, K, N, c, bk, bn, bias, seed=0 if aligned else 1234)


@pytest.mark.parametrize("T,K,N,c,bk,bn", [
    (5, 64, 64, 2, 32, 64),     # the default structure blocks
    (9, 100, 70, 2, 32, 64),    # K, N both ragged at the defaults
    (6, 130, 50, 2, 24, 48),    # BK, BN not powers of two (masked tiles)
    (4, 50, 40, 7, 8, 8),       # BK = 8 (several chunks per K iteration), BN < 16
    (3, 70, 300, 2, 16, 256),   # BN > 128: two N tiles per column block
    (17, 96, 33, 3, 32, 32),    # one padded parameter chunk (K < c*BK*ceil)
])
def test_forward_and_backward_odd_configs(T, K, N, c, bk, bn):
    check_case(T, K, N, c, bk, bn, bias=True, seed=11, backward=True)


def test_seed_changes_the_output():
    """Guards the tests above against a hash that ignores R0..R3 (or a rotation of 0).

    With VEC = 8 a chunk has only BK / 8 rotations and R0..R3 are odd, so two seeds can give
    the same map (at BK = 16 every seed does: each R only contributes its parity); take the
    next seed whose map differs."""
    T, K, N, c, bk, bn = 7, 96, 64, 3, 32, 32
    other = next(s for s in range(6, 100) if not torch.equal(
        ss1_hash.weight_index(K, N, c, 5, bk, bn), ss1_hash.weight_index(K, N, c, s, bk, bn)))
    x, P, b = make(T, K, N, c, bk, bn, False, 0)
    y = run_forward(x, P, b, c, 5, bk, bn)
    assert rel_max(y, reference(x, P, b, c, 5, bk, bn)) < 1e-5
    assert rel_max(y, reference(x, P, b, c, other, bk, bn)) > 0.1


# ----------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,c", [(7, 1), (33, 3)])
def test_forward_half_matches_reference(dtype, T, c):
    K, N, bk, bn = 3 * c * 16 - 5, 70, 16, 32
    x, P, b = make(T, K, N, c, bk, bn, True, 3, dtype)
    y = run_forward(x, P, b, c, 3, bk, bn)
    assert y.dtype == dtype and y.shape == (T, N)
    assert rel_fro(y, reference(x, P, b, c, 3, bk, bn)) < 2e-2


def test_backward_bf16_matches_reference():
    T, K, N, c, bk, bn = 20, 90, 40, 2, 16, 32
    x, P, b = make(T, K, N, c, bk, bn, True, 4, torch.bfloat16)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(9)).bfloat16()
    got = ss1_backward_triton(dy, x, P, b, c, ss1_hash.hash_coeffs(4), bk, bn, (True,) * 3)
    want = reference_grads(x, P, b, dy, c, 4, bk, bn)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and rel_fro(g, w) < 2e-2


def test_fp64():
    x, P, b = make(5, 40, 20, 2, 8, 16, True, 2, torch.float64)
    y = run_forward(x, P, b, 2, 2, 8, 16)
    assert y.dtype == torch.float64
    assert rel_max(y, reference(x, P, b, 2, 2, 8, 16)) < 1e-12


# ----------------------------------------------------------------------------- backward fp32
@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("c", [1, 2, 3, 4])
def test_backward_fp32_matches_autograd(T, c):
    K, N, bk, bn = shapes(c)[1]
    check_case(T, K, N, c, bk, bn, bias=True, seed=c, backward=True)


def test_backward_returns_none_for_unneeded_grads():
    T, K, N, c, bk, bn = 7, 60, 30, 2, 16, 16
    x, P, _ = make(T, K, N, c, bk, bn, False, 1)
    dy = torch.randn(T, N)
    co = ss1_hash.hash_coeffs(1)
    want = reference_grads(x, P, None, dy, c, 1, bk, bn)
    dx, dP, db = ss1_backward_triton(dy, x, P, None, c, co, bk, bn, (True, False, False))
    assert dP is None and db is None and rel_max(dx, want[0]) < 1e-5
    dx, dP, db = ss1_backward_triton(dy, x, P, None, c, co, bk, bn, (False, True, True))
    assert dx is None and rel_max(dP, want[1]) < 1e-5
    assert rel_max(db, want[2]) < 1e-5  # bias=None still gives dbias when asked (ops.py)


# ----------------------------------------------------------------------------- fuzzed shapes
@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 40), K=st.integers(1, 160), N=st.integers(1, 140),
       c=st.integers(1, 4), bk=st.sampled_from([8, 16, 24, 32]),
       bn=st.sampled_from([8, 16, 24, 48, 64, 160]), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fuzzed_shapes(T, K, N, c, bk, bn, bias, seed):
    check_case(T, K, N, c, bk, bn, bias, seed, backward=True)


# ----------------------------------------------------------------------------- wrapper contract
def test_dtype_mismatch_casts_P_and_bias_to_x_dtype():
    T, K, N, c, bk, bn = 4, 48, 20, 2, 16, 16
    x, P, b = make(T, K, N, c, bk, bn, True, 0, torch.float64)
    y = run_forward(x.float(), P, b, c, 0, bk, bn)
    assert y.dtype == torch.float32
    assert rel_max(y, reference(x.float(), P.float(), b.float(), c, 0, bk, bn)) < 1e-5


def test_empty_batch():
    x, P, b = make(1, 40, 20, 2, 16, 16, True, 0)
    x = x[:0]
    assert run_forward(x, P, b, 2, 0, 16, 16).shape == (0, 20)
    dx, dP, db = ss1_backward_triton(torch.zeros(0, 20), x, P, b, 2, (1, 2, 3, 4), 16, 16,
                                     (True, True, True))
    assert dx.shape == (0, 40) and not dP.any() and not db.any()


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.tensor(1.0)), "at least 1 dimension"),
    (dict(P=torch.randn(20, 48)), "K_red"),
    (dict(P=torch.randn(20)), "2-D"),
    (dict(bias=torch.randn(21)), "bias"),
    (dict(compression=0), "compression"),
    (dict(block_k=12), "block_k"),
    (dict(x=torch.randint(0, 3, (4, 40))), "floating"),
    (dict(P=torch.randn(20, 32, dtype=torch.float64)), "dtype"),
])
def test_invalid_inputs_raise(bad, match):
    """The CUDA kernel checks its arguments with the op's checks before any launch."""
    args = dict(x=torch.randn(4, 40), P=torch.randn(20, 32), bias=torch.randn(20), compression=2,
                seed=0, block_k=16, block_n=16)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ss1_linear_cuda(**args)


def test_backward_rejects_bad_dy_and_flags():
    x, P = torch.randn(4, 40), torch.randn(20, 32)
    with pytest.raises(ValueError, match="dy"):
        ss1_linear_backward_cuda(torch.randn(4, 21), x, P, 2, 0, 16, 16, [True] * 3)
    with pytest.raises(ValueError, match="needs"):
        ss1_linear_backward_cuda(torch.randn(4, 20), x, P, 2, 0, 16, 16, [True] * 2)


def test_cuda_kernel_matches_reference_with_leading_dims():
    """What ``torch.ops.structfx.ss1_linear`` runs on CUDA tensors (kernels/ops.py loads it):
    leading dims flattened, forward and backward vs the dense reference."""
    T, K, N, c, bk, bn, seed = 6, 70, 40, 2, 16, 16, 3
    x, P, b = make(T, K, N, c, bk, bn, True, seed)
    x3 = x.view(2, 3, K)
    y = ss1_linear_cuda(x3, P, b, c, seed, bk, bn)
    assert y.shape == (2, 3, N)
    assert rel_max(y.view(T, N), reference(x, P, b, c, seed, bk, bn)) < 1e-5
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    dx, dP, db = ss1_linear_backward_cuda(dy.view(2, 3, N), x3, P, c, seed, bk, bn, [True] * 3)
    want = reference_grads(x, P, b, dy, c, seed, bk, bn)
    assert dx.shape == (2, 3, K)
    for name, g, w in zip(("dx", "dP", "dbias"), (dx.view(T, K), dP, db), want):
        assert rel_max(g, w) < 1e-5, name


@pytest.mark.parametrize("needs", [f for f in itertools.product([False, True], repeat=3)
                                   if any(f) and not all(f)], ids=str)
def test_cuda_backward_computes_only_the_needed_grads(needs):
    """Frozen P / inference-time dx: the grads asked for equal those of the full backward, the
    others come back empty (the op's ``None``)."""
    T, K, N, c, bk, bn = 7, 60, 30, 2, 16, 16
    x, P, _ = make(T, K, N, c, bk, bn, False, 1)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(2))
    full = ss1_linear_backward_cuda(dy, x, P, c, 1, bk, bn, [True] * 3)
    got = ss1_linear_backward_cuda(dy, x, P, c, 1, bk, bn, list(needs))
    for name, f, g, w in zip(("dx", "dP", "dbias"), needs, got, full):
        assert torch.equal(g, w) if f else g.numel() == 0, name


def test_each_call_uses_its_own_hash():
    """Layers that share ``BK`` / ``BN`` (and so the compiled kernels: ``R0..R3`` and ``c`` are
    runtime arguments) but differ in seed and compression, run one after the other: each result
    matches the reference of its own seed and compression, forward and backward, and not that
    of the previous layer (a kernel specialized on, or caching, the first hash would)."""
    T, K, N, bk, bn = 9, 128, 48, 32, 16
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(T, N, generator=g, dtype=torch.float64).float()
    previous, distinct = None, 0
    for seed, c in [(0, 2), (1, 2), (2, 2), (7, 3), (123456, 3), (5, 1)]:
        x, P, b = make(T, K, N, c, bk, bn, True, seed)
        y = run_forward(x, P, b, c, seed, bk, bn)
        assert rel_max(y, reference(x, P, b, c, seed, bk, bn)) < 1e-5, (seed, c)
        dx, dP, _ = ss1_backward_triton(dy, x, P, b, c, ss1_hash.hash_coeffs(seed), bk, bn)
        gx, gP, _ = reference_grads(x, P, b, dy, c, seed, bk, bn)
        assert rel_max(dx, gx) < 1e-5 and rel_max(dP, gP) < 1e-5, (seed, c)
        # Same c: the previous layer's hash would also run. With VEC = 8 a chunk has only
        # BK / 8 rotations, so two seeds can give the same map; compare where they differ.
        if previous is not None and previous[1] == c and not torch.equal(
                ss1_hash.weight_index(K, N, c, seed, bk, bn),
                ss1_hash.weight_index(K, N, c, previous[0], bk, bn)):
            assert rel_max(y, reference(x, P, b, c, previous[0], bk, bn)) > 0.1, (seed, c)
            distinct += 1
        previous = (seed, c)
    assert distinct >= 2


def test_token_tile_pruning_sees_keyword_args():
    """The autotuner hands keyword launch args (T_BUCKET is one) to the prune hook as kwargs."""
    class Cfg:
        def __init__(self, bt):
            self.kwargs = {"BLOCK_T": bt}
    cfgs = [Cfg(16), Cfg(32), Cfg(64), Cfg(128)]
    kept = lambda *a, **k: [c.kwargs["BLOCK_T"] for c in ss1_triton._prune_token_tiles(*a, **k)]
    assert kept(cfgs, {}, T_BUCKET=1) == [16]
    assert kept(cfgs, {"T_BUCKET": 64}) == [16, 32, 64]
    assert kept(cfgs, {}, T_BUCKET=4096) == [16, 32, 64, 128]
