"""torch.ops.structfx.blast_linear / ss1_linear: CPU paths vs the plain references, autograd,
opcheck, torch.compile(fullgraph=True) and torch.export."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import structfx  # noqa: F401  (registers the ops)
from structfx.kernels import ops, ss1_hash
from structfx.kernels.reference import blast_linear_reference, ss1_linear_reference

from conftest import rel

blast = torch.ops.structfx.blast_linear
ss1 = torch.ops.structfx.ss1_linear


def blast_args(T, n, m, b1, b2, r, bias=True, dtype=torch.float32, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    p, q = -(-m // b1), -(-n // b2)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    return (mk(*lead, T, n), mk(b1, p, r), mk(b1, b2, r), mk(b2, q, r),
            mk(m) if bias else None, m)


def ss1_args(T, K, N, c, seed=0, bk=32, bn=64, bias=True, dtype=torch.float32, lead=()):
    g = torch.Generator().manual_seed(seed + 1)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    return (mk(*lead, T, K), mk(N, ss1_hash.reduced_k(K, c, bk)), mk(N) if bias else None,
            c, seed, bk, bn)


# ----------------------------------------------------------------------------- forward values
@pytest.mark.parametrize("T,n,m,b1,b2,r", [
    (1, 64, 64, 1, 1, 8), (7, 64, 96, 2, 2, 5), (16, 100, 70, 3, 3, 8),
    (5, 33, 47, 4, 2, 3), (3, 128, 128, 16, 16, 4), (2, 10, 7, 7, 10, 20)])
@pytest.mark.parametrize("bias", [True, False])
def test_blast_cpu_matches_reference(T, n, m, b1, b2, r, bias):
    args = blast_args(T, n, m, b1, b2, r, bias, lead=(2,))
    y = blast(*args)
    assert y.shape == (2, T, m) and y.is_contiguous()
    assert rel(y, blast_linear_reference(*(a.double() if torch.is_tensor(a) else a
                                           for a in args))) < 1e-5


@pytest.mark.parametrize("T,K,N,c,bk,bn", [
    (1, 64, 64, 1, 32, 64), (5, 64, 64, 2, 32, 64), (9, 100, 70, 2, 32, 64),
    (4, 200, 130, 3, 32, 64), (3, 97, 33, 4, 16, 16), (6, 50, 200, 7, 8, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_ss1_cpu_matches_reference(T, K, N, c, bk, bn, bias):
    args = ss1_args(T, K, N, c, seed=3, bk=bk, bn=bn, bias=bias, lead=(2,))
    y = ss1(*args)
    assert y.shape == (2, T, N) and y.is_contiguous()
    ref = ss1_linear_reference(*(a.double() if torch.is_tensor(a) else a for a in args))
    assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision(dtype, tol):
    b = blast_args(8, 96, 80, 2, 3, 6, dtype=dtype)
    ref = blast_linear_reference(*(a.double() if torch.is_tensor(a) else a for a in b))
    y = blast(*b)
    assert y.dtype == dtype and rel(y, ref) < tol
    s = ss1_args(8, 96, 80, 2, dtype=dtype)
    ref = ss1_linear_reference(*(a.double() if torch.is_tensor(a) else a for a in s))
    y = ss1(*s)
    assert y.dtype == dtype and rel(y, ref) < tol


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 20), n=st.integers(1, 80), m=st.integers(1, 80),
       b1=st.integers(1, 6), b2=st.integers(1, 6), r=st.integers(1, 12))
def test_blast_fuzz(T, n, m, b1, b2, r):
    b1, b2 = min(b1, m), min(b2, n)
    args = blast_args(T, n, m, b1, b2, r, dtype=torch.float64)
    assert rel(blast(*args), blast_linear_reference(*args)) < 1e-10


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 20), K=st.integers(1, 150), N=st.integers(1, 150),
       c=st.integers(1, 6), seed=st.integers(0, 1000), bk=st.sampled_from([8, 16, 32]),
       bn=st.sampled_from([1, 16, 64]))
def test_ss1_fuzz(T, K, N, c, seed, bk, bn):
    args = ss1_args(T, K, N, c, seed, bk, bn, dtype=torch.float64)
    assert rel(ss1(*args), ss1_linear_reference(*args)) < 1e-10


# ----------------------------------------------------------------------------- autograd
def test_blast_gradcheck():
    x, U, S, V, b, m = blast_args(4, 23, 19, 3, 2, 4, dtype=torch.float64, lead=(2,))
    inputs = [t.requires_grad_() for t in (x, U, S, V, b)]
    assert torch.autograd.gradcheck(lambda *a: blast(*a, m), inputs)
    # no bias
    assert torch.autograd.gradcheck(lambda x, U, S, V: blast(x, U, S, V, None, m), inputs[:4])


def test_ss1_gradcheck():
    x, P, b, *rest = ss1_args(3, 70, 40, 2, seed=9, bk=16, bn=16, dtype=torch.float64, lead=(2,))
    inputs = [t.requires_grad_() for t in (x, P, b)]
    assert torch.autograd.gradcheck(lambda x, P, b: ss1(x, P, b, *rest), inputs)
    assert torch.autograd.gradcheck(lambda x, P: ss1(x, P, None, *rest), inputs[:2])


def _subsets(n):
    """Every requires_grad pattern over n inputs with at least one grad (all-frozen has no
    backward)."""
    return [f for f in itertools.product([False, True], repeat=n) if any(f)]


class _BackwardCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ``needs`` flags each structfx backward op is called with."""

    def __init__(self):
        super().__init__()
        self.needs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.structfx.blast_linear_backward.default,
                    torch.ops.structfx.ss1_linear_backward.default):
            self.needs.append(tuple(args[-1]))
        return func(*args, **(kwargs or {}))


def _grads(fn, leaves, flags, dy):
    leaves = [t.detach().clone().requires_grad_(f) for t, f in zip(leaves, flags)]
    fn(*leaves).backward(dy)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("flags", _subsets(5), ids=str)
def test_blast_frozen_factors_get_no_grad(flags):
    """Only the inputs that require grad get one, equal to the grads of the full computation
    (all inputs trainable) and to autograd through the dense reference; the backward op is
    asked for exactly those."""
    x, U, S, V, b, m = blast_args(4, 23, 19, 3, 2, 4, dtype=torch.float64, lead=(2,))
    dy = torch.randn(2, 4, m, dtype=torch.float64)
    full = _grads(lambda *a: blast(*a, m), (x, U, S, V, b), (True,) * 5, dy)
    want = _grads(lambda *a: blast_linear_reference(*a, m), (x, U, S, V, b), (True,) * 5, dy)
    with _BackwardCalls() as calls:
        got = _grads(lambda *a: blast(*a, m), (x, U, S, V, b), flags, dy)
    assert calls.needs == [flags]
    for name, f, g, g_full, w in zip("xUSVb", flags, got, full, want):
        if f:
            assert torch.equal(g, g_full) and rel(g, w) < 1e-12, name
        else:
            assert g is None, name


@pytest.mark.parametrize("flags", _subsets(3), ids=str)
def test_ss1_frozen_factors_get_no_grad(flags):
    x, P, b, *rest = ss1_args(3, 70, 40, 2, seed=9, bk=16, bn=16, dtype=torch.float64, lead=(2,))
    dy = torch.randn(2, 3, 40, dtype=torch.float64)
    full = _grads(lambda *a: ss1(*a, *rest), (x, P, b), (True,) * 3, dy)
    want = _grads(lambda *a: ss1_linear_reference(*a, *rest), (x, P, b), (True,) * 3, dy)
    with _BackwardCalls() as calls:
        got = _grads(lambda *a: ss1(*a, *rest), (x, P, b), flags, dy)
    assert calls.needs == [flags]
    for name, f, g, g_full, w in zip(("x", "P", "bias"), flags, got, full, want):
        if f:
            assert torch.equal(g, g_full) and rel(g, w) < 1e-12, name
        else:
            assert g is None, name


def test_no_bias_asks_for_no_bias_grad():
    x, U, S, V, _, m = blast_args(4, 23, 19, 3, 2, 4, bias=False)
    with _BackwardCalls() as calls:
        blast(x, U.requires_grad_(), S, V, None, m).sum().backward()
    assert calls.needs == [(False, True, False, False, False)]


def test_opcheck():
    for args in (blast_args(5, 40, 30, 2, 3, 4, lead=(2,)),
                 blast_args(5, 40, 30, 2, 3, 4, bias=False)):
        args = tuple(a.requires_grad_() if torch.is_tensor(a) else a for a in args)
        torch.library.opcheck(blast, args)
    for args in (ss1_args(5, 70, 40, 2, lead=(2,)), ss1_args(5, 70, 40, 3, bias=False)):
        args = tuple(a.requires_grad_() if torch.is_tensor(a) else a for a in args)
        torch.library.opcheck(ss1, args)


# ----------------------------------------------------------------------------- graphs
class TwoOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.b = torch.nn.ParameterList(blast_args(1, 48, 40, 2, 4, 5)[1:5])
        self.s = torch.nn.ParameterList(ss1_args(1, 40, 36, 2, bk=8, bn=16)[1:3])

    def forward(self, x):
        h = torch.relu(blast(x, *self.b, 40))
        return ss1(h, self.s[0], self.s[1], 2, 0, 8, 16)


def test_compile_fullgraph_matches_eager_with_dynamic_batch():
    torch._dynamo.reset()
    mod = TwoOps()
    cmod = torch.compile(mod, fullgraph=True)
    for T in (3, 5, 9):  # the third call runs the dynamic-shape graph
        x = torch.randn(T, 6, 48)
        assert torch.allclose(cmod(x), mod(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 48, requires_grad=True)
    cmod(x).sum().backward()
    g = [p.grad.clone() for p in mod.parameters()] + [x.grad.clone()]
    mod.zero_grad()
    x.grad = None
    mod(x).sum().backward()
    for a, b in zip(g, [p.grad for p in mod.parameters()] + [x.grad]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_export_keeps_one_node_per_op():
    mod = TwoOps()
    x = torch.randn(3, 48)
    ep = torch.export.export(mod, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.structfx.blast_linear.default) == 1
    assert targets.count(torch.ops.structfx.ss1_linear.default) == 1
    assert torch.allclose(ep.module()(x), mod(x))


def test_flop_counter_knows_the_ops():
    x, U, S, V, b, m = blast_args(10, 64, 32, 2, 2, 4)
    with FlopCounterMode(display=False) as fc:
        blast(x, U, S, V, b, m)
    assert fc.get_total_flops() == 2 * 10 * 4 * (64 + 32 + 4)


def _counted(fn):
    with FlopCounterMode(display=False) as fc:
        out = fn()
    return fc.get_total_flops(), out


def _blast_by_bmm(x, U, S, V, m):
    """The BLAST product as three batched matmuls (torch counts their multiply-adds): the
    oracle for ``blast_flops``. The mixing is one ``(b1 x b2) @ (b2 x T)`` product per rank
    index, counted also where it degenerates to a broadcast multiply (b2 = 1)."""
    (b1, p, r), (b2, q, _) = U.shape, V.shape
    xb = torch.nn.functional.pad(x, (0, b2 * q - x.shape[-1])).view(-1, b2, q)
    z = torch.bmm(xb.transpose(0, 1), V)                                  # T b2 q r
    w = torch.bmm(S.permute(2, 0, 1), z.permute(2, 0, 1))                 # T b1 b2 r
    y = torch.bmm(w.permute(1, 2, 0), U.transpose(1, 2))                  # T b1 p r
    return y.transpose(0, 1).reshape(-1, b1 * p)[:, :m]


@pytest.mark.parametrize("T,n,m,b1,b2,r", [(10, 64, 32, 2, 2, 4), (7, 45, 37, 2, 3, 20),
                                           (3, 30, 50, 1, 1, 6), (5, 33, 47, 4, 2, 3)])
def test_blast_flops_count_the_multiply_adds(T, n, m, b1, b2, r):
    """``blast_flops`` (the op's FLOP formula, also the cost model's) against torch's own count
    of the bmm formulation, forward and backward."""
    x, U, S, V, _, m = blast_args(T, n, m, b1, b2, r, bias=False, dtype=torch.float64)
    want_fwd, y = _counted(lambda: _blast_by_bmm(x, U, S, V, m))
    assert rel(y, blast_linear_reference(x, U, S, V, None, m)) < 1e-12  # it is the product
    assert ops.blast_flops(x.shape, U.shape, S.shape, V.shape) == want_fwd
    got_fwd, _ = _counted(lambda: blast(x, U, S, V, None, m))
    assert got_fwd == want_fwd
    leaves = [t.requires_grad_() for t in (x, U, S, V)]
    dy = torch.randn(T, m, dtype=torch.float64)
    y_ref, y_op = _blast_by_bmm(*leaves, m), blast(*leaves, None, m)
    want_bwd, _ = _counted(lambda: torch.autograd.grad(y_ref, leaves, dy))
    got_bwd, _ = _counted(lambda: torch.autograd.grad(y_op, leaves, dy))
    assert got_bwd == want_bwd == 2 * want_fwd


@pytest.mark.parametrize("T,K,N,c,bk,bn", [(5, 64, 64, 2, 32, 64), (9, 100, 70, 2, 32, 64),
                                           (3, 97, 33, 4, 16, 16), (6, 50, 200, 7, 8, 32)])
def test_ss1_flops_count_the_gemm_and_the_sketch(T, K, N, c, bk, bn):
    """``ss1_flops`` against an independent count: torch's count of one GEMM per column block
    (``sketch_j (T, K_red) @ P_j.T``, the real rows of ``P`` only) plus one addition per input
    value gathered into a sketch (the entries of the sketch index that point into ``x``)."""
    x, P, _, c, seed, bk, bn = ss1_args(T, K, N, c, seed=2, bk=bk, bn=bn, bias=False,
                                        dtype=torch.float64)
    idx = ss1_hash.sketch_index(K, N, c, seed, bk, bn)         # (blocks, c, K_red); K = zero pad
    x_pad = torch.nn.functional.pad(x, (0, 1))
    sketches = [x_pad[:, idx[j]].sum(1) for j in range(idx.shape[0])]  # (T, K_red) each

    def by_block():
        return torch.cat([s @ P[j * bn:(j + 1) * bn].T for j, s in enumerate(sketches)], 1)

    gemm, y = _counted(by_block)
    assert rel(y, ss1_linear_reference(x, P, None, c, seed, bk, bn)) < 1e-12  # it is the product
    want = gemm + T * int((idx < K).sum())
    assert ops.ss1_flops(x.shape, P.shape, bn) == want
    assert _counted(lambda: ss1(x, P, None, c, seed, bk, bn))[0] == want


@pytest.mark.parametrize("needs", _subsets(5)[:-1], ids=str)
def test_opcheck_blast_backward(needs):
    x, U, S, V, _, m = blast_args(5, 40, 30, 2, 3, 4, lead=(2,))
    dy = torch.randn(2, 5, m)
    torch.library.opcheck(torch.ops.structfx.blast_linear_backward,
                          (dy, x, U, S, V, m, list(needs)))


@pytest.mark.parametrize("needs", _subsets(3)[:-1], ids=str)
def test_opcheck_ss1_backward(needs):
    x, P, _, c, seed, bk, bn = ss1_args(5, 70, 40, 2, lead=(2,))
    dy = torch.randn(2, 5, 40)
    torch.library.opcheck(torch.ops.structfx.ss1_linear_backward,
                          (dy, x, P, c, seed, bk, bn, list(needs)))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0], a[1], a[2][:, :1], *a[3:]), "factor shapes disagree"),
    (lambda a: (torch.randn(3, 50), *a[1:]), "input has 50 features"),
    (lambda a: (*a[:5], 1000), "out_features=1000"),
    (lambda a: (a[0].double(), *a[1:]), "dtype"),
    (lambda a: (a[0].int(), *a[1:]), "floating"),
    (lambda a: (*a[:4], torch.randn(3), a[5]), "bias has shape"),
])
def test_blast_bad_args(mutate, match):
    args = blast_args(3, 40, 30, 2, 2, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        blast(*mutate(args))


def test_ss1_bad_args():
    x, P, b, c, seed, bk, bn = ss1_args(3, 70, 40, 2)
    with pytest.raises(ValueError, match="K_red"):
        ss1(x, P[:, :-1], b, c, seed, bk, bn)
    with pytest.raises(ValueError, match="compression"):
        ss1(x, P, b, 0, seed, bk, bn)
    with pytest.raises(TypeError, match="dtype"):
        ss1(x, P.half(), b, c, seed, bk, bn)
