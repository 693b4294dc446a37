"""BlastLinear / SS1Linear modules: shapes, dtypes, padding, from_linear, to_dense, state dict."""
import io

import pytest
import torch
from torch import nn

from structfx import BlastLinear, SS1Linear

from conftest import rel


LAYERS = [
    lambda bias: BlastLinear(100, 70, 3, 8, bias=bias),
    lambda bias: BlastLinear(64, 64, (2, 4), 16, bias=bias),
    lambda bias: SS1Linear(100, 70, 2, seed=5, bias=bias),
    lambda bias: SS1Linear(130, 33, 3, seed=1, bias=bias, block_k=16, block_n=16),
]


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_forward_equals_dense_weight(make, bias, lead):
    torch.manual_seed(0)
    layer = make(bias)
    x = torch.randn(*lead, layer.in_features)
    y = layer(x)
    assert y.shape == (*lead, layer.out_features)
    W = layer.to_dense()
    assert W.shape == (layer.out_features, layer.in_features)
    assert rel(y, nn.functional.linear(x, W, layer.bias)) < 1e-5


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_and_modules(make, dtype):
    torch.manual_seed(0)
    layer = make(True)
    x = torch.randn(4, layer.in_features)
    ref = layer(x)
    y = layer(x.to(dtype))  # fp32 factors, low-precision input: factors are cast
    assert y.dtype == dtype and rel(y, ref) < 2e-2
    y2 = layer.to(dtype)(x.to(dtype))
    assert y2.dtype == dtype and rel(y2, ref) < 2e-2


@pytest.mark.parametrize("make", LAYERS)
def test_default_init_matches_linear_scale(make):
    torch.manual_seed(0)
    layer = make(True)
    std = layer.to_dense().std().item()
    want = (1 / (3 * layer.in_features)) ** 0.5  # nn.Linear's default entry std
    assert 0.5 * want < std < 2 * want


def test_parameter_shapes_and_counts():
    layer = BlastLinear(100, 70, 3, 8)
    assert layer.U.shape == (3, 24, 8) and layer.S.shape == (3, 3, 8)
    assert layer.V.shape == (3, 34, 8)
    assert layer.num_structured_params() == 8 * (3 * 24 + 3 * 34 + 9)
    s = SS1Linear(100, 70, 2)
    assert s.P.shape == (70, 64)
    assert "compression=2" in repr(s) and "blocks=(3, 3)" in repr(layer)


def test_from_linear_blast_and_ss1():
    torch.manual_seed(0)
    lin = nn.Linear(96, 64)
    b = BlastLinear.from_linear(lin, blocks=2, params=0.5)
    assert b.num_structured_params() <= 0.5 * 96 * 64
    assert 0 < b.factorization_error < 1
    assert rel(b.to_dense(), lin.weight) == pytest.approx(b.factorization_error, rel=1e-3)
    assert torch.equal(b.bias, lin.bias)
    s = SS1Linear.from_linear(lin, params=0.5, seed=3)
    assert s.compression == 2 and s.seed == 3
    assert rel(s.to_dense(), lin.weight) == pytest.approx(s.factorization_error, rel=1e-3)
    x = torch.randn(5, 96)
    assert rel(b(x), lin(x)) < 1 and rel(s(x), lin(x)) < 1


def test_from_linear_leaves_linear_untouched():
    lin = nn.Linear(48, 32)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    BlastLinear.from_linear(lin, blocks=2, rank=4)
    SS1Linear.from_linear(lin, compression=2)
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])


def test_state_dict_round_trip_keeps_the_hash():
    torch.manual_seed(0)
    s = SS1Linear(100, 70, 2, seed=11)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    s2 = SS1Linear(100, 70, 2, seed=0)  # built with another seed: loading must restore it
    s2.load_state_dict(torch.load(buf))
    x = torch.randn(3, 100)
    assert s2.seed == 11 and torch.equal(s2(x), s(x))
    b = BlastLinear(40, 30, 2, 4)
    b2 = BlastLinear(40, 30, 2, 4)
    b2.load_state_dict(b.state_dict())
    assert torch.equal(b2(torch.ones(2, 40)), b(torch.ones(2, 40)))


@pytest.mark.parametrize("make,match", [
    (lambda: BlastLinear(10, 8, 9, 2), "can't fit"),
    (lambda: BlastLinear(10, 8, 2, 0), "rank"),
    (lambda: BlastLinear(10, 8, 0, 2), "blocks"),
    (lambda: BlastLinear(10, 8, (2, 2, 2), 2), "blocks"),
    (lambda: BlastLinear(10, 8, True, 2), "blocks"),
    (lambda: BlastLinear(10, 8, (2, False), 2), "blocks"),
    (lambda: BlastLinear(10, 8, 2.0, 2), "blocks"),
    (lambda: SS1Linear(10, 8, 0), "compression"),
    (lambda: SS1Linear(10, 8, 1.5), "compression"),
    (lambda: SS1Linear(10, 8, 2, block_k=12), "block_k"),
    (lambda: BlastLinear.from_linear(nn.Conv1d(3, 3, 1)), "nn.Linear"),
])
def test_bad_configs_name_the_problem(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_blocks_accept_any_integral_type():
    """``blocks`` as numpy integers (e.g. from a config array) means the same as Python ints,
    in the layer and in the factorizer it calls (one ``block_pair`` for both)."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    a = BlastLinear.from_linear(lin, blocks=(np.int64(2), np.int32(4)), rank=3, steps=5)
    b = BlastLinear.from_linear(lin, blocks=(2, 4), rank=3, steps=5)
    assert a.blocks == b.blocks == (2, 4) and type(a.blocks[0]) is int
    x = torch.randn(3, 24)
    assert torch.equal(a(x), b(x))
    assert BlastLinear(24, 16, np.int16(2), 3).blocks == (2, 2)


def test_wrong_input_width():
    with pytest.raises(ValueError, match="last dimension 10"):
        BlastLinear(10, 8, 2, 2)(torch.randn(3, 11))
    with pytest.raises(ValueError, match="last dimension 10"):
        SS1Linear(10, 8, 2)(torch.randn(3, 11))


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    target = nn.Linear(32, 16)
    for layer in (BlastLinear(32, 16, 2, 6), SS1Linear(32, 16, 2, block_k=8, block_n=8)):
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        x = torch.randn(256, 32)
        losses = []
        for _ in range(50):
            loss = (layer(x) - target(x).detach()).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0]
