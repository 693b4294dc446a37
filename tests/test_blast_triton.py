"""BLAST Triton kernels (kernels/blast_triton.py) on CPU through the Triton interpreter.

conftest.py sets TRITON_INTERPRET=1 before triton is imported (one 16x16 tile config, so the
small shapes below still span several token / rank / p / q tiles). The oracle is
``blast_linear_reference`` (dense ``W``) in fp64 on the same rounded inputs; backward is checked
against autograd through it. Shapes cover block counts 1, 2, 4 and b1 != b2, ``m`` / ``n`` that
are and are not multiples of the blocks (padding), ranks below and across the 16-wide tile, and
token counts below, at and across the 16-row token tile.
"""
import itertools
import math

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from structfx.kernels import blast_triton
from structfx.kernels.blast_triton import (blast_backward_triton, blast_forward_triton,
                                           blast_linear_backward_cuda, blast_linear_cuda)
from structfx.kernels.reference import blast_linear_reference

GRADS = ("dx", "dU", "dS", "dV", "dbias")


def rel_max(a, ref):
    """Largest error relative to the largest reference entry (strict: no averaging)."""
    assert not torch.isnan(a).any(), "NaN in kernel output"
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def rel_fro(a, ref):
    assert not torch.isnan(a).any(), "NaN in kernel output"
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make(T, m, n, b1, b2, r, bias, seed, dtype=torch.float32):
    """Inputs in ``dtype`` (factor shapes padded up: p = ceil(m / b1), q = ceil(n / b2))."""
    p, q = -(-m // b1), -(-n // b2)
    g = torch.Generator().manual_seed(seed * 7919 + T * 131 + m * 17 + n * 3 + r)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = mk(T, n)
    U, S, V = mk(b1, p, r) / math.sqrt(r), mk(b1, b2, r), mk(b2, q, r) / math.sqrt(q)
    b = mk(m) if bias else None
    return x, U, S, V, b


def reference(x, U, S, V, b, m):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return blast_linear_reference(d(x), d(U), d(S), d(V), d(b), m)


def reference_grads(dy, x, U, S, V, b, m):
    """Autograd through the dense reference in fp64; dbias = dy.sum(0) when there is no bias."""
    leaves = [t.double().requires_grad_() for t in (x, U, S, V)]
    br = None if b is None else b.double().requires_grad_()
    blast_linear_reference(*leaves, br, m).backward(dy.double())
    db = dy.double().sum(0) if br is None else br.grad
    return tuple(t.grad for t in leaves) + (db,)


def random_dy(T, m, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(T, m, generator=g, dtype=torch.float64).to(dtype)


def check_case(T, m, n, b1, b2, r, bias, seed, backward=False, dtype=torch.float32, tol=1e-5):
    x, U, S, V, b = make(T, m, n, b1, b2, r, bias, seed, dtype)
    err = rel_max if dtype in (torch.float32, torch.float64) else rel_fro
    y = blast_forward_triton(x, U, S, V, b, m)
    assert y.shape == (T, m) and y.dtype == dtype
    assert err(y, reference(x, U, S, V, b, m)) < tol
    if backward:
        dy = random_dy(T, m, seed, dtype)
        got = blast_backward_triton(dy, x, U, S, V, b, m, (True,) * 5)
        want = reference_grads(dy, x, U, S, V, b, m)
        for name, g, w in zip(GRADS, got, want):
            assert g.shape == w.shape and g.dtype == dtype, name
            assert err(g, w) < tol, name


# (b1, b2): one block (low rank), square 2 and 4, rectangular 2 x 3
BLOCKS = [(1, 1), (2, 2), (4, 4), (2, 3)]


def sizes(b1, b2, aligned):
    """(m, n, r): aligned = multiples of the blocks, r = 16 (one tile); else ragged, r = 20."""
    if aligned:
        return 16 * b1 if b1 > 1 else 32, 12 * b2 if b2 > 1 else 48, 16
    return 37, 45, 20


# ----------------------------------------------------------------------------- forward fp32
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("aligned,bias", [(True, True), (False, False)])
def test_forward_fp32_matches_reference(T, blocks, aligned, bias):
    m, n, r = sizes(*blocks, aligned)
    check_case(T, m, n, *blocks, r, bias, seed=7 if aligned else 8)


@pytest.mark.parametrize("T,m,n,b1,b2,r", [
    (3, 20, 30, 4, 2, 5),     # r < 16, b1 > b2, several p / q rows masked in the last block
    (17, 5, 7, 4, 4, 3),      # m < b1: whole padding blocks; T one past the token tile
    (16, 64, 40, 1, 2, 33),   # r spans three rank tiles, T exactly one token tile
    (2, 70, 18, 2, 1, 8),     # b2 = 1: no mixing sum (one block-column), p spans 3 tiles
])
def test_forward_odd_shapes(T, m, n, b1, b2, r):
    check_case(T, m, n, b1, b2, r, bias=True, seed=3)


# ----------------------------------------------------------------------------- other dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,blocks", [(5, (2, 3)), (33, (4, 4))])
def test_forward_half_matches_reference(dtype, T, blocks):
    m, n, r = sizes(*blocks, aligned=False)
    check_case(T, m, n, *blocks, r, bias=True, seed=5, dtype=dtype, tol=2e-2)


def test_backward_bf16_matches_reference():
    check_case(20, 37, 45, 2, 3, 20, bias=True, seed=4, backward=True, dtype=torch.bfloat16,
               tol=2e-2)


def test_fp64_forward_and_backward():
    check_case(6, 37, 45, 2, 3, 20, bias=True, seed=2, backward=True, dtype=torch.float64,
               tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_exact_on_small_integers(dtype):
    """Entries in {-1, 0, 1} keep every product, partial sum, ``z``, ``w``, ``y`` and grad an
    integer of at most 256 (asserted below), which bf16 and fp16 hold exactly, and the kernels
    accumulate in fp32: the half-precision forward and backward must equal the fp64 dense
    reference bit for bit. A half-precision ``tl.dot`` that is wrong (the interpreter's is,
    unless the operands are upcast), or a half accumulator, cannot pass."""
    T, m, n, b1, b2, r = 20, 37, 45, 2, 3, 4   # T, p = 19, q = 15 span two 16-wide tiles
    p, q = -(-m // b1), -(-n // b2)
    g = torch.Generator().manual_seed(3)
    tern = lambda *s: torch.randint(-1, 2, s, generator=g).to(dtype)  # noqa: E731
    x, U, S, V, b, dy = tern(T, n), tern(b1, p, r), tern(b1, b2, r), tern(b2, q, r), tern(m), \
        tern(T, m)
    want_y = reference(x, U, S, V, b, m)
    want = reference_grads(dy, x, U, S, V, b, m)
    assert max(t.abs().max() for t in (want_y, *want)) <= 256  # the premise: exact in half
    assert torch.equal(blast_forward_triton(x, U, S, V, b, m).double(), want_y)
    got = blast_backward_triton(dy, x, U, S, V, b, m, (True,) * 5)
    for name, g_, w in zip(GRADS, got, want):
        assert g_.dtype == dtype and torch.equal(g_.double(), w), name


# ----------------------------------------------------------------------------- backward fp32
@pytest.mark.parametrize("T,blocks", [(1, (1, 1)), (33, (1, 1)), (1, (2, 3)), (33, (2, 3)),
                                      (5, (4, 4))], ids=str)
def test_backward_fp32_matches_autograd(T, blocks):
    m, n, r = sizes(*blocks, aligned=False)
    check_case(T, m, n, *blocks, r, bias=True, seed=T, backward=True)


def test_backward_aligned_no_bias():
    m, n, r = sizes(2, 2, aligned=True)
    check_case(9, m, n, 2, 2, r, bias=False, seed=1, backward=True)


def test_backward_returns_none_for_unneeded_grads():
    T, m, n, b1, b2, r = 7, 37, 45, 2, 3, 20
    x, U, S, V, _ = make(T, m, n, b1, b2, r, False, 1)
    dy = random_dy(T, m, 1)
    want = reference_grads(dy, x, U, S, V, None, m)
    for flags in [(True, False, False, False, False), (False, True, False, False, False),
                  (False, False, True, False, True), (False, False, False, True, False, False)]:
        got = blast_backward_triton(dy, x, U, S, V, None, m, flags)
        for name, f, g, w in zip(GRADS, flags, got, want):
            if f:
                assert rel_max(g, w) < 1e-5, (name, flags)
            else:
                assert g is None, (name, flags)


# ----------------------------------------------------------------------------- padding
def test_padding_is_masked_not_read():
    """NaN in U's rows beyond out_features and V's rows beyond n (and in x's storage past its
    n columns) must not reach y, dx or the real rows of the weight grads; the padding rows of
    dU / dV come out 0."""
    T, m, n, b1, b2, r = 18, 37, 45, 2, 3, 20
    x, U, S, V, b = make(T, m, n, b1, b2, r, True, 6)
    p, q = U.shape[1], V.shape[1]
    Un, Vn = U.clone(), V.clone()
    Un.view(b1 * p, r)[m:] = float("nan")
    Vn.view(b2 * q, r)[n:] = float("nan")
    wide = torch.full((T, n + 5), float("nan"))
    wide[:, :n] = x
    xs = wide[:, :n]  # row stride n + 5: read in place, NaN right after each row
    y = blast_forward_triton(xs, Un, S, Vn, b, m)
    assert rel_max(y, reference(x, U, S, V, b, m)) < 1e-5
    dy = random_dy(T, m, 6)
    got = blast_backward_triton(dy, xs, Un, S, Vn, b, m, (True,) * 5)
    want = reference_grads(dy, x, U, S, V, b, m)
    for name, g, w in zip(GRADS, got, want):
        assert rel_max(g, w) < 1e-5, name
    dU, dV = got[1].view(b1 * p, r), got[3].view(b2 * q, r)
    assert torch.equal(dU[m:], torch.zeros_like(dU[m:]))
    assert torch.equal(dV[n:], torch.zeros_like(dV[n:]))


# ----------------------------------------------------------------------------- fuzzed shapes
@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 36), m=st.integers(1, 48), n=st.integers(1, 48),
       b1=st.integers(1, 4), b2=st.integers(1, 4), r=st.integers(1, 20), bias=st.booleans(),
       backward=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzzed_shapes(T, m, n, b1, b2, r, bias, backward, seed):
    check_case(T, m, n, b1, b2, r, bias, seed, backward=backward)


# ----------------------------------------------------------------------------- wrapper contract
def test_factor_dtype_is_cast_to_x_dtype():
    x, U, S, V, b = make(4, 37, 45, 2, 3, 20, True, 0, torch.float64)
    y = blast_forward_triton(x.float(), U, S, V, b, 37)
    assert y.dtype == torch.float32
    f = lambda t: t.float()  # noqa: E731
    assert rel_max(y, reference(x.float(), f(U), f(S), f(V), f(b), 37)) < 1e-5
    dy = random_dy(4, 37, 0)
    got = blast_backward_triton(dy, x.float(), U, S, V, b, 37, (True,) * 5)
    assert [g.dtype for g in got] == [torch.float32] + [torch.float64] * 4


def test_empty_batch():
    x, U, S, V, b = make(1, 37, 45, 2, 3, 20, True, 0)
    x = x[:0]
    assert blast_forward_triton(x, U, S, V, b, 37).shape == (0, 37)
    dx, dU, dS, dV, db = blast_backward_triton(torch.zeros(0, 37), x, U, S, V, b, 37, (True,) * 5)
    assert dx.shape == (0, 45)
    for g, t in ((dU, U), (dS, S), (dV, V), (db, b)):
        assert g.shape == t.shape and not g.any()


def _args(**bad):
    args = dict(x=torch.randn(4, 45), U=torch.randn(2, 19, 8), S=torch.randn(2, 3, 8),
                V=torch.randn(3, 15, 8), bias=torch.randn(37), out_features=37)
    args.update(bad)
    return args


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.tensor(1.0)), "at least 1 dimension"),
    (dict(x=torch.randn(4, 46)), "b2\\*q"),
    (dict(x=torch.randint(0, 3, (4, 45))), "floating"),
    (dict(U=torch.randn(38, 8)), "must be 3-D"),
    (dict(V=torch.randn(3, 15, 9)), "factor shapes disagree"),
    (dict(S=torch.randn(3, 2, 8)), "factor shapes disagree"),
    (dict(out_features=39), "out_features"),
    (dict(out_features=0), "out_features"),
    (dict(bias=torch.randn(38)), "bias"),
    (dict(S=torch.randint(0, 3, (2, 3, 8))), "dtype"),
])
def test_invalid_inputs_raise(bad, match):
    """The CUDA kernel checks its arguments with the op's checks before any launch."""
    with pytest.raises((ValueError, TypeError), match=match):
        blast_linear_cuda(**_args(**bad))


def test_backward_rejects_bad_dy_and_flags():
    a = _args()
    del a["bias"]
    with pytest.raises(ValueError, match="dy"):
        blast_linear_backward_cuda(torch.randn(4, 38), *a.values(), [True] * 5)
    with pytest.raises(ValueError, match="needs"):
        blast_linear_backward_cuda(torch.randn(4, 37), *a.values(), [True] * 3)


def test_cuda_kernel_matches_reference_with_leading_dims():
    """What ``torch.ops.structfx.blast_linear`` runs on CUDA tensors (kernels/ops.py loads it):
    leading dims flattened, forward and backward vs the dense reference."""
    T, m, n, b1, b2, r = 6, 37, 45, 2, 3, 20
    x, U, S, V, b = make(T, m, n, b1, b2, r, True, 5)
    x3 = x.view(2, 3, n)
    y = blast_linear_cuda(x3, U, S, V, b, m)
    assert y.shape == (2, 3, m)
    assert rel_max(y.view(T, m), reference(x, U, S, V, b, m)) < 1e-5
    dy = random_dy(T, m, 5)
    got = blast_linear_backward_cuda(dy.view(2, 3, m), x3, U, S, V, m, [True] * 5)
    want = reference_grads(dy, x, U, S, V, b, m)
    assert got[0].shape == (2, 3, n)
    for name, g, w in zip(GRADS, (got[0].view(T, n), *got[1:]), want):
        assert rel_max(g, w) < 1e-5, name


@pytest.mark.parametrize("needs", [f for f in itertools.product([False, True], repeat=5)
                                   if any(f) and not all(f)], ids=str)
def test_cuda_backward_computes_only_the_needed_grads(needs):
    """Frozen factors / inference-time dx: the grads asked for equal those of the full
    backward, the others come back empty (the op's ``None``)."""
    T, m, n, b1, b2, r = 7, 37, 45, 2, 3, 20
    x, U, S, V, _ = make(T, m, n, b1, b2, r, False, 1)
    dy = random_dy(T, m, 1)
    full = blast_linear_backward_cuda(dy, x, U, S, V, m, [True] * 5)
    got = blast_linear_backward_cuda(dy, x, U, S, V, m, list(needs))
    for name, f, g, w in zip(GRADS, needs, got, full):
        assert torch.equal(g, w) if f else g.numel() == 0, name


def test_autotune_configs():
    """One small config under the interpreter; the GPU pruner clamps tiles to the problem and
    drops the duplicates (decode keeps only 16-row token tiles)."""
    kernels = (blast_triton._blast_block_gemm_kernel, blast_triton._blast_mix_gemm_kernel,
               blast_triton._blast_mix_kernel)
    for kern in kernels:
        assert len(kern.configs) == 1
    prune = blast_triton._clamp_pruner({"BLOCK_T": "T_BUCKET", "BLOCK_R": "R"})
    cfgs = [triton.Config({"BLOCK_T": t, "BLOCK_R": rr}, num_warps=4, num_stages=3)
            for t in (16, 64, 128) for rr in (32, 64)]
    kept = prune(cfgs, {"T_BUCKET": 4, "R": 40})
    assert sorted((c.kwargs["BLOCK_T"], c.kwargs["BLOCK_R"]) for c in kept) == [(16, 32),
                                                                                 (16, 64)]
    assert len(prune(cfgs, {"T_BUCKET": 256, "R": 512})) == 6
    # FMA-unit dots (fp32 without TF32, fp64) keep only output tiles up to 64x64
    prune = blast_triton._clamp_pruner({"BLOCK_T": "T_BUCKET", "BLOCK_R": "R"},
                                       area=("BLOCK_T", "BLOCK_R"))
    big = {"T_BUCKET": 256, "R": 512}
    assert len(prune(cfgs, big, PRECISION="tf32")) == 6
    kept = prune(cfgs, big, PRECISION="ieee")
    assert sorted((c.kwargs["BLOCK_T"], c.kwargs["BLOCK_R"]) for c in kept) == [
        (16, 32), (16, 64), (64, 32), (64, 64), (128, 32)]
