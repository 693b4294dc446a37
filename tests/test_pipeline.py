"""pipeline.run: failures stay per layer, unused outputs are left alone, rank-deficient
calibration (the MiniLM pooler crash) compresses."""
import pytest
import torch
from torch import nn

import structfx
from structfx import Config

CFG = Config(params=0.5, min_params=1024, progress=False, steps=20, estimate_steps=3,
             force=True, device="H100 SXM")


class Encoder(nn.Module):
    """Tokens -> hidden states, plus a CLS-only 'pooler' that sees one row per sentence."""

    def __init__(self, d=96, return_pooled=True):
        super().__init__()
        self.body = nn.Linear(d, d)
        self.ffn = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)
        self.pooler = nn.Linear(d, d)
        self.return_pooled = return_pooled

    def forward(self, x):
        h = self.out(torch.relu(self.ffn(torch.relu(self.body(x)))))
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return (h, pooled) if self.return_pooled else h


def test_rank_deficient_calibration_compresses_every_layer():
    """Regression: the pooler's Gram (fewer rows than inputs) made Cholesky fail and the whole
    compress crash after minutes of work."""
    torch.manual_seed(0)
    model = Encoder().eval()
    calib = [(torch.randn(4, 12, 96),) for _ in range(6)]   # 24 pooler rows for 96 inputs
    small = structfx.compress(model, calib[0], CFG.replace(structure="auto"), calibration=calib)
    rep = structfx.last_report()
    assert "pooler" in {d.name for d in rep.replaced} and len(rep.replaced) >= 3, str(rep)
    assert not any("failed" in (d.skip or "") for d in rep.layers), str(rep)
    assert all(torch.isfinite(t).all() for t in small(*calib[0]))


def test_a_layer_whose_output_is_unused_stays_dense():
    torch.manual_seed(0)
    model = Encoder(return_pooled=False).eval()
    x = torch.randn(2, 8, 96)
    structfx.compress(model, (x,), CFG)
    rows = {d.name: d for d in structfx.last_report().layers}
    if "pooler" in rows:       # torch.export may already drop the dead node
        assert rows["pooler"].structure == "dense"
        assert "never used" in rows["pooler"].skip


def test_one_failing_layer_stays_dense_and_the_others_are_kept(monkeypatch):
    from structfx.passes import factorize

    real = factorize._compute

    def flaky(site, cand, config, calib):
        if site.name == "ffn":
            raise RuntimeError("boom in ffn")
        return real(site, cand, config, calib)

    monkeypatch.setattr(factorize, "_compute", flaky)
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 8, 96)
    small = structfx.compress(model, (x,), CFG)
    rows = {d.name: d for d in structfx.last_report().layers}
    assert rows["ffn"].structure == "dense" and "boom in ffn" in rows["ffn"].skip
    assert rows["body"].structure != "dense" and rows["out"].structure != "dense"
    ref = model(x)
    assert all(torch.isfinite(t).all() for t in small(x))
    assert small(x)[0].shape == ref[0].shape
    with pytest.raises(RuntimeError, match="boom in ffn"):
        structfx.compress(model, (x,), CFG.replace(strict=True))


def test_chosen_lowrank_layer_is_the_truncated_svd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 128)).eval()
    x = torch.randn(16, 96)
    small = structfx.compress(model, (x,), CFG.replace(structure="lowrank"))
    (d,) = structfx.last_report().replaced
    r = int(d.settings.split("=")[1])
    W = model[0].weight.detach().double()
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    best = float(s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    assert d.weight_error == pytest.approx(best, rel=1e-4)
    layer = small.get_submodule("0")
    assert torch.allclose(layer.to_dense().double(), (U[:, :r] * s[:r]) @ Vh[:r], atol=1e-5)


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 128), nn.BatchNorm1d(128), nn.ReLU(),
                         nn.Linear(128, 96)).train()


def _buffers(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_compress_export_and_distill_leave_train_mode_batch_norm_buffers_alone(tmp_path):
    model = _bn_model()
    before = _buffers(model)
    x = torch.randn(32, 96)
    calib = [(torch.randn(32, 96),) for _ in range(3)]
    with pytest.warns(UserWarning):
        small = structfx.compress(model, (x,), CFG, calibration=calib)
    after = _buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "compress"
    structfx.distill(small, model, calib, steps=2, progress=False)
    after = _buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "distill"
    with pytest.warns(UserWarning):
        structfx.export_onnx(model, (x,), tmp_path / "m.onnx", CFG)
    after = _buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "export_onnx"
