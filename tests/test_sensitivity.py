"""The sensitivity pass (``passes/sensitivity.py``) and sensitivity-weighted allocation."""
import pytest
import torch
from torch import nn

import structfx
from structfx import Config
from structfx.passes.match import match_linears
from structfx.passes.sensitivity import EPS, output_sensitivity
from structfx.passes.store import FactorStore


class TwoBranches(nn.Module):
    """``y = a(x) + scale * b(x)``: noise in a branch moves ``y`` by exactly itself."""

    def __init__(self, n=48, scale=0.05):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(n, n), nn.Linear(n, n)
        with torch.no_grad():
            for lin in (self.a, self.b):
                lin.weight.copy_(torch.randn(n, n, generator=g) / n ** 0.5)
        self.scale = scale

    def forward(self, x):
        return self.a(x) + self.scale * self.b(x)


def _graph(model, x):
    gm = torch.export.export(model, (x,)).module()
    return gm, match_linears(gm)


def test_linear_branches_have_their_exact_sensitivity():
    model, x = TwoBranches(), torch.randn(32, 48)
    gm, sites = _graph(model, x)
    w = output_sensitivity(gm, sites, (x,))
    with torch.no_grad():
        y2 = float(model(x).double().pow(2).sum())
        clean_a = float((x @ model.a.weight.T).double().pow(2).sum())
        clean_b = float((x @ model.b.weight.T).double().pow(2).sum())
    names = {s.name for s in sites}
    assert names == {"a", "b"}
    # the noise has norm EPS * ||x W^T|| exactly, and reaches y unchanged (a) or scaled (b)
    assert w["a"] == pytest.approx(clean_a / y2, rel=1e-4)
    assert w["b"] == pytest.approx(model.scale ** 2 * clean_b / y2, rel=1e-4)
    assert EPS < 0.5


def test_only_downstream_nodes_are_rerun():
    """A layer after a nonlinearity: the measured change matches a full perturbed forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).eval()
    x = torch.randn(64, 16)
    gm, sites = _graph(model, x)
    w = output_sensitivity(gm, sites, (x,), seed=3)
    # the last layer's noise reaches the output as is: its sensitivity is its share of y
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        last = float((h @ model[2].weight.T).double().pow(2).sum())
        y2 = float(model(x).double().pow(2).sum())
    assert w["2"] == pytest.approx(last / y2, rel=1e-4)
    assert w["0"] > 0


def test_sensitivity_moves_the_budget_to_the_layer_that_matters():
    """With calibration data and sensitivity=True, the branch scaled by 0.05 is compressed
    harder than the one that carries the output; weighted by parameter count (the default)
    the two identical-size layers are treated alike."""
    model = TwoBranches(n=128)
    torch.manual_seed(1)
    calib = [(torch.randn(64, 128),) for _ in range(2)]
    cfg = Config(structure="lowrank", params=0.5, min_params=0, force=True, progress=False,
                 rank_fractions=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875),
                 device="H100 SXM")
    kept = {}
    for sens in (False, True):
        structfx.compress(model, calib[0], cfg.replace(sensitivity=sens), calibration=calib,
                          store=FactorStore())
        kept[sens] = {d.name: d.params for d in structfx.last_report().layers}
    assert kept[True]["b"] < kept[True]["a"], kept
    assert abs(kept[False]["a"] - kept[False]["b"]) <= abs(kept[True]["a"] - kept[True]["b"])


def test_a_failed_measurement_falls_back_to_parameter_weights(monkeypatch):
    from structfx import pipeline

    def broken(*a, **k):
        raise RuntimeError("graph the interpreter can't run")

    monkeypatch.setattr(pipeline, "output_sensitivity", broken)
    model = TwoBranches(n=64)
    calib = [(torch.randn(32, 64),)]
    cfg = Config(structure="lowrank", params=0.5, min_params=0, force=True, progress=False,
                 device="H100 SXM", sensitivity=True)
    with pytest.warns(UserWarning, match="sensitivity not measured.*can't run"):
        structfx.compress(model, calib[0], cfg, calibration=calib, store=FactorStore())
    assert len(structfx.last_report().replaced) == 2
    with pytest.raises(RuntimeError, match="can't run"):
        structfx.compress(model, calib[0], cfg.replace(strict=True), calibration=calib,
                          store=FactorStore())


def test_whole_forward_passes_when_the_activations_are_too_many_to_keep():
    """Above ``keep_bytes`` each layer's run is a whole forward pass: the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 8)).eval()
    x = torch.randn(64, 16)
    gm, sites = _graph(model, x)
    kept = output_sensitivity(gm, sites, (x,), seed=4)
    rerun = output_sensitivity(gm, sites, (x,), seed=4, keep_bytes=0)
    assert set(kept) == {"0", "2", "4"}
    for name in kept:
        assert rerun[name] == pytest.approx(kept[name], rel=1e-9), name
